#!/usr/bin/env bash
# Builds .venv-newest: the newest supported stack (requirements/newest.txt), on top of .venv.
# Its site-packages holds only the packages that differ from the lock; a .pth file then appends
# .venv's site-packages (with its .pth files: the editable install and the start-up hook), so
# torch, LAVIS and this package are shared, and importlib.metadata finds the newer versions first.
# Needs .venv (scripts/bootstrap.sh). Idempotent: its own stamp, rebuilt when either list, this
# script or .venv's stamp changes.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=.venv
VENV=.venv-newest
STAMP=$VENV/.bootstrap-stamp
[ -f "$BASE/.bootstrap-stamp" ] || { echo "bootstrap_newest: run scripts/bootstrap.sh first" >&2; exit 1; }
BASE_SITE=$("$BASE/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
fingerprint=$(cat requirements/newest.txt requirements/lock.txt scripts/bootstrap_newest.sh "$BASE/.bootstrap-stamp" \
  <(echo "$BASE_SITE") | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ]; then
  echo "bootstrap_newest: $VENV is up to date ($fingerprint)"
  exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$BASE/bin/python" -m venv --without-pip "$VENV"  # no pip/setuptools of its own to shadow .venv's
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
# --target: installs into the folder whatever .venv already has; --no-deps: newest.txt is complete.
"$BASE/bin/pip" --disable-pip-version-check install --quiet --no-deps --target "$SITE" -r requirements/newest.txt \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
rm -rf "$SITE/bin"  # console scripts written by --target would run .venv's interpreter
echo "import site; site.addsitedir('$BASE_SITE')" > "$SITE/zz_lock_env.pth"
# torchrun for the distributed tests, run by this interpreter
printf '#!/bin/sh\nexec "$(dirname "$0")/python" -m torch.distributed.run "$@"\n' > "$VENV/bin/torchrun"
chmod +x "$VENV/bin/torchrun"

# The stack must be what newest.txt says, as importlib.metadata reports it (transformers reads it too).
"$VENV/bin/python" - requirements/newest.txt <<'EOF'
import importlib.metadata, re, sys

pins = dict(re.match(r"([\w.-]+)==(\S+)", line).groups() for line in open(sys.argv[1])
            if line.strip() and not line.startswith("#"))
wrong = {name: importlib.metadata.version(name) for name, version in pins.items()
         if importlib.metadata.version(name) != version}
assert not wrong, f"bootstrap_newest: the base environment shadows {wrong}"
EOF
echo "$fingerprint" > "$STAMP"
echo "bootstrap_newest: done in $(( $(date +%s) - start )) s ($(tr '\n' ' ' < <(grep -v '^#' requirements/newest.txt)))"
