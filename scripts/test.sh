#!/usr/bin/env bash
# The README's test command: install what the tests need, start libvirt, build the
# guest image (cached by content hash), and run the whole suite on real parts.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/install-deps.sh --test
bash scripts/start-libvirt.sh
VENV=${VMCRI_VENV:-/opt/vmcri/venv}
# One guest image for the whole run: the one `vmcri image build` keeps under /var/lib/vmcri.
export VMCRI_TEST_GUEST_ROOT=${VMCRI_TEST_GUEST_ROOT:-/var/lib/vmcri}
export VMCRI_TEST_GUEST_DIR=${VMCRI_TEST_GUEST_DIR:-$VMCRI_TEST_GUEST_ROOT/guest/current}
"$VENV/bin/vmcri" image build
exec "$VENV/bin/python" -m pytest -ra -p no:cacheprovider "$@"
