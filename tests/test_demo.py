"""`vmcri demo` end to end: the CLI against a real daemon, real VMs, a real registry."""
import html
import json
import os
import platform
import socket
import subprocess
import sys
import urllib.request

import pytest
from cri_api.v1 import api_pb2 as pb

from vmcri import config, demo, demo_image, demo_report


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


@pytest.mark.registry
def test_demo_image_is_served_and_the_registry_goes_away():
    reg, ref = demo_image.serve_busybox(config.Config(), log=lambda *_: None)
    try:
        manifest = json.load(urllib.request.urlopen(urllib.request.Request(
            f"http://{reg.address}/v2/{demo_image.REPO}/manifests/{demo_image.TAG}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})))
        assert ref == f"{reg.address}/{demo_image.REPO}:{demo_image.TAG}"
        assert len(manifest["layers"]) == 1
    finally:
        reg.stop()
    assert reg.proc.poll() is not None and not os.path.exists(reg.workdir)
    assert not _listening(reg.address)


def test_demo_without_a_daemon_fails_clearly(tmp_path):
    sock = tmp_path / "nothing.sock"
    r = subprocess.run([sys.executable, "-m", "vmcri.cli", "--config", "/dev/null", "demo",
                        "--socket", str(sock), "--html", str(tmp_path / "r.html"),
                        "--image", "127.0.0.1:1/none:1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"no CRI server answers on {sock}" in r.stdout
    assert not (tmp_path / "r.html").exists()


@pytest.mark.vm  # boots two VMs: run under the VM lock
@pytest.mark.registry
def test_demo_shows_vm_isolation_and_cleans_up(daemon_factory, tmp_path):
    d = daemon_factory('cni_conf_dir = ""')
    html_path, json_path = tmp_path / "demo.html", tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "vmcri.cli", "--config", d.config_path, "demo",
                        "--socket", d.socket, "--html", str(html_path), "--json", str(json_path)],
                       capture_output=True, text=True, timeout=900)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + d.log()[-3000:]
    rep = json.loads(json_path.read_text())
    a, b, c = rep["pods"]
    host = rep["host"]
    # each VM pod is its own kernel instance, and not the host's
    assert a["view"]["kernel"] != platform.release()
    assert len({a["view"]["boot_id"], b["view"]["boot_id"], host["boot_id"]}) == 3
    # the host sandbox runs the same container on the host's own kernel, with no VM
    assert (a["kind"], b["kind"], c["kind"]) == ("vm", "vm", "host")
    assert c["view"]["boot_id"] == host["boot_id"] and c["view"]["kernel"] == platform.release()
    assert not c["domain"] and not c["qemu_pid"]
    assert any(c["marker"] in line for line in rep["host_sees_qemu"])
    assert a["view"]["pid1"] == "vmcri-pod-init"  # the pod's PID namespace, not the host's
    assert a["view"]["mem_mib"] < host["mem_mib"]
    assert not any(a["marker"] in line for line in b["view"]["processes"])
    assert all(c["passed"] for c in rep["checks"]), rep["checks"]
    assert "running" in a["dominfo"]
    page = html.unescape(html_path.read_text())  # the claims' apostrophes are escaped
    assert a["domain"] and a["domain"] in page and b["domain"] in page
    assert "all checks passed" in page and "all checks passed" in r.stdout
    assert "container in host sandbox demo-host" in page and "shares the host's kernel" in page
    # nothing left behind: pods, domains, the throwaway registry
    assert rep["cleaned_up"]
    left = d.runtime.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        label_selector={"app": "vmcri-demo"}))).items
    assert left == []
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert a["domain"] not in domains and b["domain"] not in domains
    assert rep["registry"] and not _listening(rep["registry"])
    images = d.image.ListImages(pb.ListImagesRequest()).images
    assert not any(rep["image"] in t for i in images for t in i.repo_tags)


def _view(**kw):
    base = dict(kernel="6.1.0-57-amd64", boot_id="b-1", pid1="sleep 1", mem_mib=200, cpus=1,
                cpu_model="QEMU", uptime_s=3.0, hostname="h", nprocs=2, processes=["PID COMMAND"])
    return demo.View(**{**base, **kw})


def test_probe_parsing_tolerates_a_hostile_or_odd_guest():
    v = demo.view_from_probe("kernel=6.1\nmem_kib=not-a-number\ngarbage line\ncpus=2\n=x\n", [])
    assert (v.kernel, v.mem_mib, v.cpus, v.boot_id) == ("6.1", 0, 2, "?")


def test_report_marks_failed_checks_and_escapes_guest_text():
    pods = [demo.PodRun(name=n, domain=f"vmcri-{n}", view=_view(pid1="<script>x</script>"),
                        dominfo="State: running") for n in ("demo-a", "demo-b")]
    rep = demo.Report(runtime="vmcri", image="img", host=_view(boot_id="host"), pods=pods,
                      checks=[demo.Check("kernels differ", False, "same boot_id")], host_sees_qemu=[])
    assert not rep.ok
    assert "[FAILED] kernels differ" in demo_report.text(rep)
    page = demo_report.html_page(rep)
    assert "SOME CHECKS FAILED" in page and "<script>" not in page and "&lt;script&gt;" in page
    assert json.loads(rep.to_json())["ok"] is False


def test_report_has_a_column_for_the_host_sandbox():
    pods = [demo.PodRun(name=n, domain=f"vmcri-{n}", view=_view(), dominfo="State: running")
            for n in ("demo-a", "demo-b")]
    pods.append(demo.PodRun(name="demo-host", kind="host", view=_view(boot_id="host")))
    rep = demo.Report(runtime="vmcri", image="img", host=_view(boot_id="host"), pods=pods,
                      checks=demo.host_sandbox_checks(_view(boot_id="host"), pods[0], pods[2], {}),
                      host_sees_qemu=[])
    out = demo_report.text(rep)
    assert "demo-host" in out and "none: crun + conmon" in out  # its column (wrapped)
    assert "[ok] the host sandbox's container shares the host's kernel" in out
    # the host sees no process with the marker here: that check fails
    assert "[FAILED] the host sees the host sandbox's container" in out
    assert "none (no VM)" in demo_report.html_page(rep)
