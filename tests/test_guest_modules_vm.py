"""Guest kernel modules: the erofs root carries /lib/modules/<release>/ with a depmod index
and kmod's /sbin/modprobe, so the guest kernel loads networking modules on demand
(request_module) when a container asks for a bridge, a veth pair, a vxlan, /dev/net/tun, an
iptables NAT REDIRECT or TPROXY rule, conntrack. Only inside the guest: the host's modules
are never looked at after the build.

The container image brings its own iptables (the host's xtables-nft-multi and
xtables-legacy-multi with the libraries ldd names and the xtables plugins), as a
service-mesh init container does; the guest root ships no iptables.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support import fx_registry
from tests.test_sandbox_vm import pod_config
from vmcri.agent import pid1
from vmcri.guestimage import builder, kernel

XTABLES_DIR = "/usr/lib/x86_64-linux-gnu/xtables"


# -- units ----------------------------------------------------------------------------

def test_select_takes_names_and_whole_directories():
    deps = {
        "bridge": ("kernel/net/bridge/bridge.ko", ["kernel/net/802/stp.ko"]),
        "stp": ("kernel/net/802/stp.ko", []),
        "nf_tables": ("kernel/net/netfilter/nf_tables.ko", []),
        "xt_REDIRECT": ("kernel/net/netfilter/xt_REDIRECT.ko", []),
        "ip_vs": ("kernel/net/netfilter/ipvs/ip_vs.ko", []),
    }
    names = kernel.select(["bridge", "kernel/net/netfilter/", "nf_tables"], deps)
    assert names == ["bridge", "ip_vs", "nf_tables", "xt_REDIRECT"]
    with pytest.raises(kernel.KernelError, match="no modules under"):
        kernel.select(["kernel/net/nope/"], deps)


def test_static_nodes_from_modules_devname(tmp_path):
    devname = tmp_path / "modules.devname"
    devname.write_text("# Device nodes to trigger on-demand module loading.\n"
                       "fuse fuse c10:229\ntun net/tun c10:200\nevil ../../etc/x c1:1\n")
    dev = tmp_path / "dev"
    dev.mkdir()
    made = pid1.module_static_nodes(str(devname), str(dev))
    assert made == [str(dev / "fuse"), str(dev / "net" / "tun")]
    st = os.lstat(dev / "net" / "tun")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 200)
    assert not (tmp_path / "etc").exists()
    assert pid1.module_static_nodes(str(devname), str(dev)) == []  # already there
    assert pid1.module_static_nodes(str(tmp_path / "missing"), str(dev)) == []


def test_late_modules_script_reads_the_order_file():
    script = pid1.late_modules_script()
    assert pid1.LATE_ORDER in script and "/bin/busybox insmod" in script
    assert pid1.LATE_ORDER == f"/lib/modules/{builder.LATE_ORDER}"


# -- the real image (no VM) -------------------------------------------------------------

@pytest.fixture(scope="module")
def root_tree(guest_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("modroot") / "root"
    r = subprocess.run(["fsck.erofs", f"--extract={out}", guest_image.rootfs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_root_has_a_module_tree_kmod_resolves(guest_image, root_tree):
    release = guest_image.manifest["kernel_release"]
    mods = root_tree / "lib" / "modules" / release
    for name in ("modules.dep.bin", "modules.alias.bin", "modules.builtin.bin", "modules.devname"):
        assert (mods / name).exists(), name
    assert os.readlink(root_tree / "sbin" / "modprobe") == "/bin/kmod"
    assert {"bridge", "veth", "tun", "vxlan", "nf_tables", "xt_TPROXY", "nf_conntrack",
            "iptable_nat", "9p"} <= set(guest_image.manifest["modules_tree"])
    # the late modules stay uncompressed (busybox insmod at boot); the rest is xz
    late = (root_tree / "lib" / "modules" / builder.LATE_ORDER).read_text().split()
    assert late and all(p.endswith(".ko") and (root_tree / p.lstrip("/")).exists() for p in late)
    assert (mods / "kernel" / "net" / "bridge" / "bridge.ko.xz").exists()
    # the guest's own kmod resolves the aliases the kernel asks for
    for alias, last in (("rtnl-link-bridge", "bridge.ko.xz"), ("rtnl-link-vxlan", "vxlan.ko.xz"),
                        ("nft-chain-2-nat", "nft_chain_nat.ko.xz"), ("ipt_REDIRECT", "xt_REDIRECT.ko.xz"),
                        ("xt_TPROXY", "xt_TPROXY.ko.xz"), ("char-major-10-200", "tun.ko.xz"),
                        ("iptable_nat", "iptable_nat.ko.xz")):
        r = subprocess.run(["chroot", str(root_tree), "/sbin/modprobe", "-S", release, "-n", "-v", alias],
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split()[-1].endswith(last), (alias, r.stdout, r.stderr)


# -- in a real pod VM -------------------------------------------------------------------

def _host_tools_rootfs(dest: str) -> str:
    """The host's iptables (nft and legacy) with its libraries and plugins, at host paths."""
    bins = ["/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi"]
    libs = set()
    for b in bins + [os.path.join(XTABLES_DIR, f) for f in os.listdir(XTABLES_DIR)]:
        out = subprocess.run(["ldd", b], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if "=>" in parts and len(parts) > 2 else (parts[0] if parts else "")
            if path.startswith("/"):
                libs.add(path)
    for p in [*bins, *sorted(libs)]:
        target = os.path.join(dest, p.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.realpath(p), target)
        os.chmod(target, 0o755)
    shutil.copytree(XTABLES_DIR, os.path.join(dest, XTABLES_DIR.lstrip("/")), dirs_exist_ok=True)
    for name, multi in (("iptables", "xtables-nft-multi"), ("iptables-legacy", "xtables-legacy-multi")):
        os.symlink(multi, os.path.join(dest, "usr", "sbin", name))
    os.makedirs(os.path.join(dest, "run"), exist_ok=True)
    return dest


@pytest.fixture(scope="module")
def netpod(daemon_factory, registry, busybox_base_layer, tmp_path_factory):
    if not os.path.exists("/usr/sbin/xtables-nft-multi") or not os.path.isdir(XTABLES_DIR):
        pytest.skip("the host has no iptables to put in the test image")
    layout = str(tmp_path_factory.mktemp("modoci") / "layout")
    tools = _host_tools_rootfs(str(tmp_path_factory.mktemp("iptroot") / "rootfs"))
    desc = fx_registry.write_oci_image(layout, [busybox_base_layer, fx_registry.build_layer([("tree", tools)])],
                                       {**fx_registry.BASE_CONFIG, "User": "root"})
    fx_registry.set_layout_index(layout, "iptables", [desc])
    ref = f"{registry}/vmcri-test/busybox-iptables:1.0"
    fx_registry.push_layout(layout, "iptables", ref)
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]' % registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    cfg = pod_config("modules")
    cfg.linux.security_context.privileged = True
    cfg.log_directory = str(tmp_path_factory.mktemp("modules-logs"))
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    yield d, sid, cfg, ref
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def _container(netpod, name, privileged=False, add_caps=()):
    d, sid, cfg, ref = netpod
    c = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=ref),
                           command=["/bin/sh", "-c", "exec sleep 100000"], log_path=f"{name}.log")
    if privileged:
        c.linux.security_context.privileged = True
    c.linux.security_context.capabilities.add_capabilities.extend(add_caps)
    cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg, config=c)).container_id
    d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def _sh(netpod, cid, script, timeout=120):
    r = netpod[0].runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["/bin/sh", "-c", script],
                                                      timeout=timeout))
    return r.exit_code, (r.stdout + r.stderr).decode(errors="replace")


def _loaded(netpod, cid, names):
    rc, out = _sh(netpod, cid, "for m in " + " ".join(names) + "; do [ -d /sys/module/$m ] && echo $m; done; true")
    return set(out.split())


@pytest.mark.vm
@pytest.mark.registry
def test_privileged_container_autoloads_links_and_netfilter(netpod):
    cid = _container(netpod, "netadmin-priv", privileged=True)
    rc, out = _sh(netpod, cid, "cat /proc/sys/kernel/modprobe; ls /sbin/modprobe /lib/modules 2>&1; true")
    assert out.split()[0] == "/sbin/modprobe"
    assert "No such file" in out  # the kernel runs the guest root's kmod, not the container's
    before = _loaded(netpod, cid, ["bridge", "veth", "vxlan", "tun", "nf_tables", "nf_conntrack"])
    assert before == set(), f"loaded before anything asked for them: {before}"

    rc, out = _sh(netpod, cid, "set -e; ip link add br0 type bridge; ip link add v0 type veth peer name v1; "
                               "ip link add vx0 type vxlan id 42 dstport 4789 dev lo || true; "
                               "cat /dev/net/tun 2>/dev/null || true; ip -o link show")
    assert rc == 0, out
    # (busybox ip ignores "peer name v1": the peer gets the kernel's name, veth0)
    assert "br0:" in out and "v0@" in out and "vx0:" in out, out
    got = _loaded(netpod, cid, ["bridge", "stp", "llc", "veth", "vxlan", "udp_tunnel", "tun"])
    assert got == {"bridge", "stp", "llc", "veth", "vxlan", "udp_tunnel", "tun"}, got

    # a service-mesh init container: nft-backed iptables, NAT REDIRECT, TPROXY, socket and conntrack
    rc, out = _sh(netpod, cid, "set -e; "
                  "iptables -t nat -A OUTPUT -p tcp --dport 9999 -j REDIRECT --to-ports 15001; "
                  "iptables -t mangle -A PREROUTING -p tcp --dport 9998 -m socket -j TPROXY "
                  "--on-port 15006 --tproxy-mark 0x1/0x1; "
                  "iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT; "
                  "iptables-legacy -t nat -A OUTPUT -p tcp --dport 9997 -j REDIRECT --to-ports 15001; "
                  "iptables -t nat -S OUTPUT; iptables-legacy -t nat -S OUTPUT")
    assert rc == 0, out
    assert "--to-ports 15001" in out and "--dport 9997" in out, out
    want = {"nf_tables", "nft_compat", "nft_chain_nat", "nf_nat", "nf_conntrack", "xt_REDIRECT",
            "xt_TPROXY", "nf_tproxy_ipv4", "xt_socket", "xt_conntrack", "ip_tables", "iptable_nat"}
    got = _loaded(netpod, cid, sorted(want))
    assert got == want, f"not loaded: {want - got}"

    # the REDIRECT rule works: a connection to :9999 reaches the listener on :15001
    rc, out = _sh(netpod, cid, "(echo redirected | nc -l -p 15001 &) ; sleep 1; "
                               "nc 127.0.0.1 9999 </dev/null & sleep 2; kill $! 2>/dev/null; true")
    assert "redirected" in out, out

    # privileged means CAP_SYS_MODULE: init_module itself is reached (and rejects a non-module)
    rc, out = _sh(netpod, cid, "insmod /bin/busybox")
    assert rc != 0 and "Operation not permitted" not in out, out


@pytest.mark.vm
@pytest.mark.registry
def test_net_admin_container_autoloads_but_cannot_load_modules_itself(netpod):
    cid = _container(netpod, "netadmin-only", add_caps=["NET_ADMIN"])
    rc, out = _sh(netpod, cid, "ip link add dm0 type dummy; "
                               "ip -o link show")
    assert "dm0" in out, out
    assert {"dummy"} <= _loaded(netpod, cid, ["dummy"])
    rc, out = _sh(netpod, cid, "insmod /bin/busybox")
    assert rc != 0 and "Operation not permitted" in out, out
    # the guest's tree is not in the container, and its /proc/sys is read-only
    rc, out = _sh(netpod, cid, "echo /tmp/x > /proc/sys/kernel/modprobe")
    assert rc != 0, out
