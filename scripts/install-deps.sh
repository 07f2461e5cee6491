#!/usr/bin/env bash
# Idempotent: Debian packages, libvirt config, the Python venv with vmcri installed.
# Used by both README commands. Needs root on Debian 12.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VMCRI_VENV:-/opt/vmcri/venv}
WITH_TEST=${1:-}

DEBIAN_PKGS=(
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config qemu-system-x86
  crun erofs-utils kmod cpio iproute2 skopeo containernetworking-plugins
  conmon  # host sandboxes (hostNetwork/hostPID/hostIPC pods): the per-container monitor
  python3 python3-venv python3-dev gcc
  docker-registry  # `vmcri demo` serves its busybox image from a throwaway loopback registry
)
TEST_PKGS=(umoci shellcheck ruby)  # shellcheck, ruby: the lab's provision.sh and Vagrantfile

missing=()
want=("${DEBIAN_PKGS[@]}")
[ "$WITH_TEST" = "--test" ] && want+=("${TEST_PKGS[@]}")
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -q
  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${missing[@]}"
fi

# Without user=root every createXML() re-probes QEMU for ~44 s on hosts whose /dev/kvm
# is root-only (HOST-NOTES §1); 9p passthrough also needs qemu to run as root.
conf=/etc/libvirt/qemu.conf
if ! grep -q '^# vmcri settings' "$conf"; then
  printf '\n# vmcri settings\nuser = "root"\ngroup = "root"\n' >> "$conf"
fi

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
extra=""
[ "$WITH_TEST" = "--test" ] && extra="[test]"
stamp="$VENV/.vmcri-installed$extra"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  echo "== pip install -e $here$extra"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$here$extra"
  touch "$stamp"
fi
ln -sf "$VENV/bin/vmcri" /usr/local/bin/vmcri
