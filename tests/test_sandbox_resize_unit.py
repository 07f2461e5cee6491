"""Sizing arithmetic of UpdatePodSandboxResources and pool growth (no VM)."""
import types

import pytest
from cri_api.v1 import api_pb2 as pb

from vmcri.config import Config, ConfigError, from_dict
from vmcri.errors import InvalidArgument
from vmcri.sandbox import designer, sandbox_resize
from vmcri.sandbox.domain import render_dimm
from vmcri.sandbox.pool import WarmPool
from vmcri.sandbox.virt import Dimm, LiveShape, parse_shape

MIB = 1 << 20


def res(quota=0, period=0, mem_mib=0):
    return pb.LinuxContainerResources(cpu_quota=quota, cpu_period=period,
                                      memory_limit_in_bytes=mem_mib * MIB)


# -- target: the same arithmetic as RunPodSandbox --------------------------------

@pytest.mark.parametrize("quota,period,over_quota,want", [
    (100000, 100000, 0, 1),
    (150000, 100000, 0, 2),       # 1.5 CPUs -> 2 vCPUs
    (200000, 100000, 0, 2),
    (100000, 100000, 50000, 2),   # overhead counts too
    (1000, 100000, 0, 1),         # a sliver of a CPU is still one vCPU
    (300000, 100000, 0, 3),
])
def test_target_vcpus_match_run_sizing(quota, period, over_quota, want):
    cfg = Config()
    overhead = res(over_quota, 100000 if over_quota else 0)
    tgt = sandbox_resize.target(cfg, res(quota, period), overhead)
    assert tgt.vcpus == want
    linux = pb.LinuxPodSandboxConfig(resources=res(quota, period), overhead=overhead)
    assert designer.size(cfg, linux).vcpus == want  # RunPodSandbox would boot this many


def test_target_caps_at_max_vcpus_and_says_so():
    cfg = Config(max_vcpus=4)
    tgt = sandbox_resize.target(cfg, res(900000, 100000), None)
    assert tgt.vcpus == 4
    assert tgt.cpus == 9.0
    assert any("capped at max_vcpus 4" in n for n in tgt.notes)


def test_target_memory_is_limit_plus_guest_overhead_floored():
    cfg = Config()
    assert sandbox_resize.target(cfg, res(mem_mib=512), None).memory_mib == 512 + designer.GUEST_OVERHEAD_MIB
    assert sandbox_resize.target(cfg, res(mem_mib=256), res(mem_mib=64)).memory_mib == 320 + designer.GUEST_OVERHEAD_MIB
    assert sandbox_resize.target(cfg, res(mem_mib=8), None).memory_mib == cfg.min_memory_mib
    linux = pb.LinuxPodSandboxConfig(resources=res(mem_mib=512))
    assert designer.size(cfg, linux).memory_mib == 512 + designer.GUEST_OVERHEAD_MIB


def test_target_leaves_unmentioned_dimensions_alone():
    cfg = Config()
    only_mem = sandbox_resize.target(cfg, res(mem_mib=300), None)
    assert only_mem.vcpus is None and only_mem.memory_mib is not None
    only_cpu = sandbox_resize.target(cfg, res(200000, 100000), None)
    assert only_cpu.memory_mib is None and only_cpu.vcpus == 2
    nothing = sandbox_resize.target(cfg, None, None)
    assert (nothing.vcpus, nothing.memory_mib) == (None, None)
    unlimited = sandbox_resize.target(cfg, res(-1, 100000), None)
    assert unlimited.vcpus is None


@pytest.mark.parametrize("bad,field", [
    (res(100000, 50), "resources.cpu_period"),
    (res(100000, 2_000_000), "resources.cpu_period"),
    (res(-5, 100000), "resources.cpu_quota"),
    (res(500, 100000), "resources.cpu_quota"),
    (res(100000, 0), "resources.cpu_quota"),
    (pb.LinuxContainerResources(memory_limit_in_bytes=-1), "resources.memory_limit_in_bytes"),
])
def test_validate_names_the_field(bad, field):
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        sandbox_resize.validate("resources", bad)


def test_validate_accepts_what_the_kubelet_sends():
    for ok in (res(), res(-1, 100000), res(100000, 100000, 128), res(0, 100000)):
        sandbox_resize.validate("resources", ok)


# -- memory plans --------------------------------------------------------------------

def shape(boot=256, dimms=(), max_mib=2048, slots=16, vcpus=1, max_vcpus=8):
    return LiveShape(vcpus=vcpus, max_vcpus=max_vcpus, boot_memory_mib=boot,
                     max_memory_mib=max_mib, slots=slots,
                     dimms=[Dimm(f"dimm{i}", s, f"<memory model='dimm'>{i}</memory>")
                            for i, s in enumerate(dimms)])


def test_grow_rounds_up_to_whole_dimms():
    plan = sandbox_resize.plan_memory(shape(), 300)
    assert plan.attach_mib == 128 and not plan.notes
    assert sandbox_resize.plan_memory(shape(), 1000).attach_mib == 768


def test_grow_is_capped_at_the_vm_max_and_reported():
    plan = sandbox_resize.plan_memory(shape(max_mib=1024), 4000)
    assert plan.attach_mib == 768
    assert "capped" in plan.notes[0]


def test_grow_without_hotplug_or_slots_is_reported_not_applied():
    off = sandbox_resize.plan_memory(shape(max_mib=0, slots=0), 512)
    assert off.attach_mib == 0 and "hotplug is off" in off.notes[0]
    full = sandbox_resize.plan_memory(shape(dimms=(128, 128), slots=2), 1024)
    assert full.attach_mib == 0 and "slots" in full.notes[0]


def test_shrink_unplugs_newest_dimms_never_boot_memory():
    s = shape(dimms=(256, 128))  # 640 MiB
    plan = sandbox_resize.plan_memory(s, 512)
    assert [d.alias for d in plan.detach] == ["dimm1"] and not plan.notes
    plan = sandbox_resize.plan_memory(s, 256)
    assert [d.alias for d in plan.detach] == ["dimm1", "dimm0"] and not plan.notes
    plan = sandbox_resize.plan_memory(s, 128)
    assert len(plan.detach) == 2 and "boot memory" in plan.notes[0]
    plan = sandbox_resize.plan_memory(shape(), 128)
    assert not plan.detach and "no balloon" in plan.notes[0]


def test_shrink_keeps_a_dimm_that_would_go_below_the_ask():
    plan = sandbox_resize.plan_memory(shape(dimms=(128,)), 300)  # 384 -> 256 < 300
    assert not plan.detach and not plan.notes


def test_max_memory_and_dimm_sizes():
    cfg = Config(max_memory_mib=2048)
    assert designer.max_memory_mib(cfg, 256) == 2048
    assert designer.max_memory_mib(cfg, 300) == 300 + 1664  # whole DIMMs above boot memory
    assert designer.max_memory_mib(cfg, 2000) == 0  # no room for a single DIMM
    assert designer.max_memory_mib(Config(max_memory_mib=0), 256) == 0
    assert designer.dimm_mib(1) == 128 and designer.dimm_mib(129) == 256


# -- guest and libvirt parsing ---------------------------------------------------------

@pytest.mark.parametrize("text,count", [("0", 1), ("0-2", 3), ("0-1,3", 3), ("0,2-3\n", 3)])
def test_parse_cpu_list(text, count):
    assert sandbox_resize.parse_cpu_list(text) == count


@pytest.mark.parametrize("text", ["", "x", "3-1", "0-99999", "-1"])
def test_parse_cpu_list_rejects_garbage_from_the_guest(text):
    with pytest.raises(ValueError):
        sandbox_resize.parse_cpu_list(text)


LIVE_XML = """<domain type='qemu' id='3'><name>vmcri-x</name>
  <maxMemory slots='16' unit='KiB'>2097152</maxMemory>
  <memory unit='KiB'>393216</memory><currentMemory unit='KiB'>393216</currentMemory>
  <vcpu placement='static' current='3'>8</vcpu>
  <cpu><numa><cell id='0' cpus='0-7' memory='262144' unit='KiB'/></numa></cpu>
  <devices><memory model='dimm'><target><size unit='KiB'>131072</size><node>0</node></target>
  <alias name='dimm0'/><address type='dimm' slot='0' base='0x100000000'/></memory></devices>
</domain>"""


def test_parse_shape_reads_libvirts_live_xml():
    s = parse_shape(LIVE_XML)
    assert (s.vcpus, s.max_vcpus) == (3, 8)
    assert (s.boot_memory_mib, s.memory_mib, s.max_memory_mib, s.slots) == (256, 384, 2048, 16)
    assert s.dimms[0].alias == "dimm0" and "dimm0" in s.dimms[0].xml


def test_parse_shape_without_hotplug():
    s = parse_shape("<domain><memory unit='KiB'>262144</memory><vcpu>2</vcpu><devices/></domain>")
    assert (s.vcpus, s.max_vcpus, s.memory_mib, s.max_memory_mib, s.dimms) == (2, 2, 256, 0, [])


def test_render_dimm():
    xml = render_dimm(256)
    assert "<size unit='MiB'>256</size>" in xml and "model='dimm'" in xml
    with pytest.raises(ValueError):
        render_dimm(0)


def test_config_max_memory_mib():
    assert from_dict({"max_memory_mib": 0}).max_memory_mib == 0
    with pytest.raises(ConfigError, match="max_memory_mib"):
        from_dict({"max_memory_mib": 200})  # not above default_memory_mib


# -- warm pool: which pods a pool VM can grow into ------------------------------------

def pool_with(cfg):
    pool = WarmPool.__new__(WarmPool)
    pool.svc = types.SimpleNamespace(cfg=cfg)
    return pool


@pytest.mark.parametrize("vcpus,mem,fits", [
    (1, 256, True),     # the pool's shape
    (2, 256, True),     # more vCPUs: hotplug
    (8, 256, True),
    (2, 612, True),     # more memory: one DIMM of 384 MiB fits under 2048
    (1, 2048, True),
    (1, 2049, False),   # above max_memory_mib: cold boot
    (1, 128, False),    # smaller pods boot cold rather than hold memory
])
def test_pool_fits(vcpus, mem, fits):
    assert pool_with(Config()).fits(designer.Sizing(vcpus, mem, "pod resources")) is fits


def test_pool_without_memory_hotplug_only_grows_vcpus():
    pool = pool_with(Config(max_memory_mib=0))
    assert pool.fits(designer.Sizing(4, 256, "pod resources"))
    assert not pool.fits(designer.Sizing(1, 384, "pod resources"))
