"""ContainerStats / PodSandboxStats RPC bodies: ask the guest agent, shape with vmcri.stats."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from vmcri import stats as st

log = logging.getLogger(__name__)
_rates = st.CpuRate()
# A guest whose agent failed a sample is skipped for a while: the List*Stats calls ask every
# pod in turn, and one silent guest must not cost everyone its timeout on every poll.
FAILED_SAMPLE_BACKOFF_S = 30.0
_failed_at: dict[str, float] = {}
# List* calls ask the guests side by side: the kubelet's poll then costs the slowest pod,
# not the sum of all of them.
SAMPLE_WORKERS = 8


def _each(fn, items: list) -> list:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(SAMPLE_WORKERS, len(items)), thread_name_prefix="stats") as ex:
        return list(ex.map(fn, items))


def _agent_sample(svc, sandbox, method: str, raise_unknown: bool = False, **params) -> dict | None:
    """The agent's reply, or None. raise_unknown: an agent that does not know `method`
    raises its AgentError instead (the caller has an older call to fall back on)."""
    from vmcri.channel import AgentError
    if sandbox is None or sandbox.state != "READY":
        return None
    now = time.monotonic()
    if now - _failed_at.get(sandbox.id, -FAILED_SAMPLE_BACKOFF_S) < FAILED_SAMPLE_BACKOFF_S:
        return None
    try:
        reply = svc.sandboxes.agent(sandbox).call(method, timeout=10, **params)
    except AgentError as e:
        if raise_unknown and "unknown method" in str(e):
            raise
        log.info("%s from %s: %s (no samples from it for %.0fs)", method, sandbox.id[:12], e,
                 FAILED_SAMPLE_BACKOFF_S)
        for sid in [k for k, t in _failed_at.items() if now - t > FAILED_SAMPLE_BACKOFF_S]:
            del _failed_at[sid]  # forget old failures (and removed pods)
        _failed_at[sandbox.id] = time.monotonic()
        return None
    _failed_at.pop(sandbox.id, None)
    return reply if isinstance(reply, dict) else None


# Pods whose agent predates container_metrics (booted before an upgrade) get container_stats.
_legacy_agents: set[str] = set()


def _container_sample(svc, sb, rec) -> dict | None:
    from vmcri.channel import AgentError
    if sb is None or sb.id in _legacy_agents:
        return _agent_sample(svc, sb, "container_stats", id=rec.id)
    try:
        return _agent_sample(svc, sb, "container_metrics", raise_unknown=True, id=rec.id)
    except AgentError:
        if len(_legacy_agents) > 4096:
            _legacy_agents.clear()
        _legacy_agents.add(sb.id)
        return _agent_sample(svc, sb, "container_stats", id=rec.id)


def one_container(svc, rec):
    sb = svc.sandboxes.find(rec.sandbox_id)
    sample = _container_sample(svc, sb, rec) if rec.state == "RUNNING" else None
    return st.container_stats(svc, rec, _rates, sample)


def container_stats(svc, container_id: str):
    return one_container(svc, svc.get(container_id))


def list_container_stats(svc, flt) -> list:
    wanted = []
    for rec in svc.table.all():
        if rec.state not in ("RUNNING", "CREATED", "EXITED"):
            continue
        if flt is not None:
            if flt.id and not rec.id.startswith(flt.id):
                continue
            if flt.pod_sandbox_id and not rec.sandbox_id.startswith(flt.pod_sandbox_id):
                continue
            if any(rec.labels.get(k) != v for k, v in flt.label_selector.items()):
                continue
        wanted.append(rec)
    return _each(lambda rec: one_container(svc, rec), wanted)


def one_sandbox(svc, sb):
    sb = svc.sandboxes.refresh(sb)
    sample = _agent_sample(svc, sb, "sandbox_stats")
    containers = [one_container(svc, r) for r in svc.table.for_sandbox(sb.id)
                  if r.state == "RUNNING"]
    return st.sandbox_stats(sb, _rates, sample or {}, containers)


def pod_sandbox_stats(svc, sandbox_id: str):
    return one_sandbox(svc, svc.sandboxes.get(sandbox_id))


def list_pod_sandbox_stats(svc, flt) -> list:
    wanted = []
    for sb in svc.sandboxes.table.all():
        if sb.state != "READY":
            continue
        if flt is not None:
            if flt.id and not sb.id.startswith(flt.id):
                continue
            if any(sb.labels.get(k) != v for k, v in flt.label_selector.items()):
                continue
        wanted.append(sb)
    return _each(lambda sb: one_sandbox(svc, sb), wanted)
