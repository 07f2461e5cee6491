#!/usr/bin/env bash
# The README's first command: install vmcri, start libvirt and the daemon on the
# embedded defaults, then run a demo pod. Idempotent: a running daemon is reused.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/install-deps.sh
bash scripts/start-libvirt.sh
VENV=${VMCRI_VENV:-/opt/vmcri/venv}
"$VENV/bin/vmcri" image build

# A default pod network, as CRI-O's package ships one, only where none exists.
if ! ls /etc/cni/net.d/*.conf* /etc/cni/net.d/*.json >/dev/null 2>&1; then
  install -d /etc/cni/net.d
  install -m 0644 packaging/cni/10-vmcri-bridge.conflist /etc/cni/net.d/
  echo "== installed the default CNI config /etc/cni/net.d/10-vmcri-bridge.conflist"
fi

sock=/run/vmcri/vmcri.sock
if [ -f /run/vmcri/vmcri.pid ] && kill -0 "$(cat /run/vmcri/vmcri.pid)" 2>/dev/null; then
  echo "== vmcri already running (pid $(cat /run/vmcri/vmcri.pid))"
else
  install -d -m 0711 /run/vmcri /var/log/vmcri
  echo "== starting vmcri serve (log: /var/log/vmcri/vmcri.log)"
  setsid "$VENV/bin/vmcri" serve >>/var/log/vmcri/vmcri.log 2>&1 < /dev/null &
  echo $! > /run/vmcri/vmcri.pid
  for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.2; done
  [ -S "$sock" ] || { tail -20 /var/log/vmcri/vmcri.log; exit 1; }
fi
"$VENV/bin/vmcri" demo --socket "$sock" --html /var/lib/vmcri/demo-report.html
