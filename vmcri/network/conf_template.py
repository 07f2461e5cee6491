"""The kubelet's pod CIDR (UpdateRuntimeConfig) rendered into a CNI config, as containerd's
`conf_template` does: clusters without a CNI daemonset still get per-node pod ranges.

The template is Jinja2 with `pod_cidr` (the first range), `pod_cidr_ranges` (all of them,
dual-stack sends two) and `routes` (a default route per address family).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import tempfile

import jinja2

from vmcri import errors

log = logging.getLogger(__name__)

OUTPUT_NAME = "10-vmcri-net.conflist"
FIELD = "runtime_config.network_config.pod_cidr"
MAX_TEMPLATE_BYTES = 64 * 1024


def parse_pod_cidrs(value: str) -> list[str]:
    """'10.1.0.0/24,fd00::/64' -> normalised ranges; INVALID_ARGUMENT names the field."""
    if len(value) > 1024:
        raise errors.InvalidArgument(f"{FIELD}: longer than 1024 characters")
    ranges = []
    for part in (p.strip() for p in value.split(",")):
        try:
            ranges.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as e:
            raise errors.InvalidArgument(f"{FIELD}: {part!r} is not a CIDR: {e}") from None
    return ranges


def render(template_path: str, ranges: list[str]) -> str:
    try:
        with open(template_path, encoding="utf-8") as f:
            source = f.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as e:
        raise errors.FailedPrecondition(f"cni_conf_template: cannot read {template_path}: {e}") from e
    if len(source) > MAX_TEMPLATE_BYTES:
        raise errors.FailedPrecondition(f"cni_conf_template: {template_path} is over {MAX_TEMPLATE_BYTES} bytes")
    routes = sorted({"0.0.0.0/0" if ipaddress.ip_network(r).version == 4 else "::/0" for r in ranges})
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    try:
        text = env.from_string(source).render(pod_cidr=ranges[0], pod_cidr_ranges=ranges, routes=routes)
        json.loads(text)
    except jinja2.TemplateError as e:
        raise errors.FailedPrecondition(f"cni_conf_template: {template_path}: {e}") from e
    except ValueError as e:
        raise errors.FailedPrecondition(f"cni_conf_template: {template_path} does not render to JSON: {e}") from e
    return text


def write(conf_dir: str, text: str) -> str:
    """Atomically replace the rendered config: a CNI ADD never reads half a file."""
    os.makedirs(conf_dir, exist_ok=True)
    path = os.path.join(conf_dir, OUTPUT_NAME)
    fd, tmp = tempfile.mkstemp(dir=conf_dir, prefix=".vmcri-net-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def apply(cfg, pod_cidr: str) -> str | None:
    """Render and write when a template is configured; return the written path."""
    if not pod_cidr:
        return None
    ranges = parse_pod_cidrs(pod_cidr)
    if not cfg.cni_conf_template or not cfg.cni_conf_dir:
        return None
    path = write(cfg.cni_conf_dir, render(cfg.cni_conf_template, ranges))
    log.info("pod CIDR %s: wrote CNI config %s from %s", ",".join(ranges), path, cfg.cni_conf_template)
    return path
