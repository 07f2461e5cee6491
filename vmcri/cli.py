"""vmcri command line: serve | doctor | image build | demo | config."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from vmcri import config as config_mod


def _load(args) -> config_mod.Config:
    try:
        return config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"vmcri: bad config: {e}", file=sys.stderr)
        raise SystemExit(2)


def cmd_serve(args) -> int:
    cfg = _load(args)
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vmcri.daemon import serve
    serve(cfg)
    return 0


def cmd_config(args) -> int:
    cfg = _load(args)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    return 0


def cmd_image_build(args) -> int:
    cfg = _load(args)
    from vmcri import guestimage
    image = guestimage.build(cfg, force=args.force)
    print(f"guest image ready: {image.dir}")
    return 0


def cmd_doctor(args) -> int:
    cfg = _load(args)
    from vmcri.daemon import Runtime
    rt = Runtime(cfg)
    ok_all = True
    for cond, ok, reason, msg in rt.conditions():
        ok_all &= ok
        print(f"{cond:13} {'ok' if ok else 'NOT READY'}  {reason} {msg}".rstrip())
    print(f"accel         {rt.accel.name}  ({rt.accel.reason})")
    rt.close()
    return 0 if ok_all else 1


def cmd_demo(args) -> int:
    cfg = _load(args)
    from vmcri import demo
    return demo.main(cfg, socket=args.socket or cfg.socket_path, html=args.html, keep=args.keep,
                     image=args.image, json_path=args.json)


def main(argv: list[str] | None = None) -> int:
    config_help = f"TOML config (default {config_mod.DEFAULT_CONFIG_PATH} if present)"
    p = argparse.ArgumentParser(prog="vmcri", description=__doc__)
    p.add_argument("--config", help=config_help)
    # `vmcri serve --config F` works as well as `vmcri --config F serve`: SUPPRESS keeps a
    # subcommand without the flag from resetting the top-level value to None.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", parents=[common], help="serve CRI v1 on the unix socket").set_defaults(fn=cmd_serve)
    sub.add_parser("config", parents=[common], help="print the effective config").set_defaults(fn=cmd_config)
    sub.add_parser("doctor", parents=[common], help="check libvirt, guest image and CNI").set_defaults(fn=cmd_doctor)
    img = sub.add_parser("image", help="guest image").add_subparsers(dest="image_cmd", required=True)
    b = img.add_parser("build", parents=[common], help="build the guest kernel, initramfs and erofs root")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is fresh")
    b.set_defaults(fn=cmd_image_build)
    d = sub.add_parser("demo", parents=[common], help="isolation demo: a pod that is a VM")
    d.add_argument("--socket", help="CRI socket of a running vmcri")
    d.add_argument("--html", default="vmcri-demo.html", help="where to write the HTML report")
    d.add_argument("--keep", action="store_true", help="leave the demo pods running")
    d.add_argument("--image", help="container image to run (default: a busybox image the demo "
                   "builds and serves from a throwaway registry on 127.0.0.1)")
    d.add_argument("--json", help="also write the report's facts as JSON here")
    d.set_defaults(fn=cmd_demo)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
