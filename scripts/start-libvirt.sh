#!/usr/bin/env bash
# Start virtlogd and libvirtd when they are not running (hosts and CI without systemd).
set -euo pipefail
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl start virtlogd libvirtd
else
  alive /run/virtlogd.pid || virtlogd -d
  alive /run/libvirtd.pid || libvirtd -d
fi
for _ in $(seq 1 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.3
done
echo "libvirtd did not answer on qemu:///system" >&2
exit 1
