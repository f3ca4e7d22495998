# One bootstrap builds .venv from nothing (idempotent); test and demo call it when needed. A second
# (scripts/bootstrap_newest.sh) builds .venv-newest, the newest supported stack over .venv, for make test.
PYTHON := .venv/bin/python
NEWEST_PYTHON := .venv-newest/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup setup-newest test test-lock test-newest test-fast demo app clean

setup:
	bash scripts/bootstrap.sh

# The newest supported stack (requirements/newest.txt) over .venv's packages
setup-newest: setup
	bash scripts/bootstrap_newest.sh

# The lock's full suite, then the fast suite on the newest supported stack
test: test-lock test-newest

test-lock: setup
	$(PYTHON) -m pytest -q

test-newest: setup-newest
	$(NEWEST_PYTHON) -m pytest -q -m "not slow"

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"

demo: setup
	$(PYTHON) -m lavis_medblip.demo

app: setup
	$(PYTHON) -m lavis_medblip.app

clean:
	rm -rf .venv .venv-newest .cache
