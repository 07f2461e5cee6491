"""The lab and operator packaging, checked with the real tools available offline: shellcheck,
bash running the provisioning steps into a scratch root, systemd-analyze, ruby evaluating the
Vagrantfile, the CRI protobuf schema for the crictl JSON configs, and a real daemon for them."""
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import tarfile
import time

import pytest
import yaml
from cri_api.v1 import api_pb2 as pb
from google.protobuf import json_format

from vmcri import config

REPO = pathlib.Path(__file__).resolve().parent.parent
PROVISION = REPO / "vagrant" / "provision.sh"
PKG = REPO / "packaging"


def bash_steps(script: str, root: pathlib.Path, **env) -> subprocess.CompletedProcess:
    """Source provision.sh (defines steps, runs nothing) and run `script` with VMCRI_LAB_ROOT=root."""
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{PROVISION}"; {script}'],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VMCRI_LAB_ROOT": str(root), **env})


def test_provision_script_is_shellcheck_clean():
    r = subprocess.run(["shellcheck", "-x", str(PROVISION)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_sourcing_runs_nothing_and_unknown_roles_fail(tmp_path):
    r = bash_steps("echo sourced", tmp_path)
    assert r.stdout == "sourced\n" and not any(tmp_path.iterdir())
    r = subprocess.run(["bash", str(PROVISION), "nope"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown role 'nope'" in r.stderr


def _fake_crictl_tarball(path: pathlib.Path, version: str) -> str:
    script = f"#!/bin/sh\necho 'crictl version {version}'\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("crictl")
        ti.size, ti.mode = len(script), 0o755
        tar.addfile(ti, io.BytesIO(script))
    data = gzip.compress(buf.getvalue())
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_crictl_install_verifies_the_checksum(tmp_path):
    tarball = tmp_path / "crictl.tar.gz"
    good = _fake_crictl_tarball(tarball, "v1.34.0")
    root = tmp_path / "root"
    bad = bash_steps(f'CRICTL_URL=file://{tarball}; CRICTL_SHA256={"0" * 64}; install_crictl', root)
    assert bad.returncode != 0 and "sha256 mismatch" in bad.stderr
    assert not (root / "usr/local/bin/crictl").exists()
    assert list(tmp_path.glob("**/crictl.tar.gz.*")) == []  # no half-verified leftovers
    ok = bash_steps(f"CRICTL_URL=file://{tarball}; CRICTL_SHA256={good}; install_crictl", root)
    assert ok.returncode == 0, ok.stderr
    crictl = root / "usr/local/bin/crictl"
    assert os.access(crictl, os.X_OK)
    again = bash_steps(f"CRICTL_URL=file://{tmp_path}/gone; install_crictl", root)
    assert again.returncode == 0 and "already installed" in again.stdout


def test_pinned_crictl_matches_the_release_naming():
    text = PROVISION.read_text()
    version = text.split("CRICTL_VERSION=", 1)[1].split()[0]
    sha = text.split("CRICTL_SHA256=", 1)[1].split()[0]
    assert len(sha) == 64 and int(sha, 16) >= 0
    r = bash_steps('echo "$CRICTL_URL"', pathlib.Path("/nonexistent"))
    assert r.stdout.strip() == ("https://github.com/kubernetes-sigs/cri-tools/releases/download/"
                                f"{version}/crictl-{version}-linux-amd64.tar.gz")


def test_configs_land_and_agree_with_vmcri(tmp_path):
    r = bash_steps("write_configs; install_cni_config; install_service", tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = config.load(str(tmp_path / "etc/vmcri/config.toml"))
    assert cfg.cgroup_driver == "systemd"
    crictl = yaml.safe_load((tmp_path / "etc/crictl.yaml").read_text())
    endpoint = f"unix://{config.Config().socket_path}"
    assert crictl["runtime-endpoint"] == crictl["image-endpoint"] == endpoint
    unit = (tmp_path / "etc/systemd/system/vmcri.service").read_text()
    assert unit == (PKG / "systemd/vmcri.service").read_text()
    conflist = json.loads((tmp_path / "etc/cni/net.d/10-vmcri-bridge.conflist").read_text())
    assert conflist["name"] == "vmcri"
    # an operator's edited config and CNI choice are kept on re-provisioning
    (tmp_path / "etc/vmcri/config.toml").write_text('accel = "tcg"\n')
    (tmp_path / "etc/cni/net.d/10-vmcri-bridge.conflist").unlink()
    (tmp_path / "etc/cni/net.d/05-mine.conf").write_text("{}")
    assert bash_steps("write_configs; install_cni_config", tmp_path).returncode == 0
    assert (tmp_path / "etc/vmcri/config.toml").read_text() == 'accel = "tcg"\n'
    assert not (tmp_path / "etc/cni/net.d/10-vmcri-bridge.conflist").exists()


def test_systemd_unit_verifies_and_keeps_pods_on_restart(tmp_path):
    unit = PKG / "systemd/vmcri.service"
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    keys = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                if "=" in line and not line.startswith("#"))
    assert keys["Type"] == "simple" and keys["KillMode"] == "process"
    assert keys["Requires"] == "libvirtd.service"
    assert {"libvirtd.service", "virtlogd.service"} <= set(keys["After"].split())
    assert "ExecStartPre" not in keys and "RuntimeDirectory" not in keys
    assert keys["ExecStart"].split()[-1] == "serve"


RUBY_STUB = r"""
class Rec
  def initialize(path, log) = (@path = path; @log = log)
  def method_missing(name, *args, **kw, &blk)
    key = "#{@path}.#{name}"
    if name.to_s.end_with?("=")
      @log[key.chomp("=")] = args[0]
    elsif blk
      @log[key] = args; blk.call(Rec.new([key, *args.first(1)].join("."), @log))
    elsif args.empty? && kw.empty?
      return Rec.new(key, @log)
    else
      (@log[key] ||= []) << [*args, kw]
    end
    self
  end
  def respond_to_missing?(*) = true
end
module Vagrant
  LOG = {}
  def self.configure(_v) = yield(Rec.new("config", LOG))
end
load ARGV[0]
require "json"
puts JSON.generate(Vagrant::LOG)
"""


@pytest.mark.parametrize("kube", ["0", "1"])
def test_vagrantfile_shape(tmp_path, kube):
    stub = tmp_path / "stub.rb"
    stub.write_text(RUBY_STUB)
    r = subprocess.run(["ruby", str(stub), str(REPO / "vagrant/Vagrantfile")], capture_output=True,
                       text=True, env={**os.environ, "VMCRI_LAB_KUBE": kube,
                            "VMCRI_LAB_TOKEN_FILE": str(tmp_path / "token")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = json.loads(r.stdout)
    assert log["config.vm.box"] == "debian/bookworm64"
    lv = "config.vm.define.vmcri.vm.provider.libvirt"
    assert log[f"{lv}.nested"] is True and log[f"{lv}.cpu_mode"] == "host-passthrough"
    assert log[f"{lv}.memory"] >= 4096
    synced = log["config.vm.synced_folder"][0]
    assert synced[:2] == ["..", "/opt/vmcri/src"] and synced[2]["type"] == "rsync"
    provisions = [p[1]["args"] for p in log["config.vm.define.vmcri.vm.provision"]]
    assert provisions == ([["vmcri"]] if kube == "0" else [["vmcri"], ["kube-node"]])
    assert ("config.vm.define.cp.vm.provision" in log) == (kube == "1")
    token = (tmp_path / "token").read_text()
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)  # what kubeadm accepts


def test_kubernetes_manifests_agree():
    rc = yaml.safe_load((PKG / "k8s/runtimeclass.yaml").read_text())
    pod = yaml.safe_load((PKG / "k8s/demo-pod.yaml").read_text())
    join = yaml.safe_load((PKG / "kubelet/kubeadm-join.yaml").read_text())
    kubelet = yaml.safe_load((PKG / "kubelet/kubelet-config.yaml").read_text())
    assert (rc["apiVersion"], rc["kind"], rc["handler"]) == ("node.k8s.io/v1", "RuntimeClass", "vmcri")
    assert pod["spec"]["runtimeClassName"] == rc["metadata"]["name"]
    assert not any(pod["spec"].get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    endpoint = f"unix://{config.Config().socket_path}"
    assert join["nodeRegistration"]["criSocket"] == endpoint
    assert kubelet["containerRuntimeEndpoint"] == kubelet["imageServiceEndpoint"] == endpoint
    # the node's label and taint are exactly what the RuntimeClass selects and tolerates
    labels = dict(a["value"].split("=", 1) for a in join["nodeRegistration"]["kubeletExtraArgs"]
                  if a["name"] == "node-labels")
    assert rc["scheduling"]["nodeSelector"].items() <= labels.items()
    taint = join["nodeRegistration"]["taints"][0]
    assert any(t["key"] == taint["key"] and t["effect"] == taint["effect"]
               for t in rc["scheduling"]["tolerations"])


def crictl_configs() -> tuple[pb.PodSandboxConfig, pb.ContainerConfig]:
    """crictl reads these JSON files into the CRI messages; unknown fields are errors here too."""
    pod = json_format.ParseDict(json.loads((PKG / "crictl/pod.json").read_text()), pb.PodSandboxConfig())
    ctr = json_format.ParseDict(json.loads((PKG / "crictl/container.json").read_text()),
                                pb.ContainerConfig())
    return pod, ctr


def test_crictl_configs_are_cri_messages():
    pod, ctr = crictl_configs()
    assert pod.metadata.name and pod.metadata.uid and pod.log_directory.startswith("/")
    assert ctr.image.image and ctr.log_path == "shell.log" and ctr.command


@pytest.mark.vm
@pytest.mark.registry
def test_crictl_walkthrough_configs_on_a_real_daemon(daemon_factory, test_images, tmp_path):
    """What docs/operating.md has the reader do with crictl: runp, create, start, exec, logs,
    stopp, rmp, with the RuntimeClass handler, through the same CRI calls crictl makes."""
    d = daemon_factory('cni_conf_dir = ""')
    pod, ctr = crictl_configs()
    pod.log_directory = str(tmp_path)
    ctr.image.image = test_images.multi.ref
    handler = yaml.safe_load((PKG / "k8s/runtimeclass.yaml").read_text())["handler"]
    d.image.PullImage(pb.PullImageRequest(image=ctr.image))
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler=handler)).pod_sandbox_id
    try:
        st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
        assert st.runtime_handler == handler and st.state == pb.SANDBOX_READY
        cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=ctr, sandbox_config=pod)).container_id
        d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["hostname"], timeout=60))
        assert (r.exit_code, r.stdout) == (0, pod.hostname.encode() + b"\n")
        log_file = tmp_path / ctr.log_path
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "hello" not in (
                log_file.read_text() if log_file.exists() else ""):
            time.sleep(0.2)
        assert f"hello from {pod.hostname} on kernel" in log_file.read_text()
    finally:
        d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
