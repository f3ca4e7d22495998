# One bootstrap builds .venv from nothing (idempotent); test and demo call it when needed. A second
# (scripts/bootstrap_newest.sh) builds .venv-newest, the newest supported stack over .venv, for make test.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON := .venv/bin/python
NEWEST_PYTHON := .venv-newest/bin/python
LOCK_SUITE := $(PYTHON) -m pytest -q
NEWEST_SUITE := $(NEWEST_PYTHON) -m pytest -q -m "not slow"
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup setup-newest test test-lock test-newest test-fast demo app clean

setup:
	bash scripts/bootstrap.sh

# The newest supported stack (requirements/newest.txt) over .venv's packages
setup-newest: setup
	bash scripts/bootstrap_newest.sh

# The lock's full suite and the fast suite on the newest supported stack, side by side: much of a
# suite's time runs on one core (its subprocess tests' Python start-up), so two suites fill 2 cores.
# Each keeps torch's thread count (the arithmetic of a lone run); OMP_WAIT_POLICY=PASSIVE stops idle
# OpenMP threads spinning on the other suite's core. Lines carry their suite's prefix; either failing fails.
test: setup-newest
	@export OMP_WAIT_POLICY=PASSIVE; \
	$(LOCK_SUITE) 2>&1 | sed -u 's/^/[lock]   /' & lock=$$!; \
	$(NEWEST_SUITE) 2>&1 | sed -u 's/^/[newest] /' & newest=$$!; \
	wait $$lock; lock_status=$$?; wait $$newest; newest_status=$$?; \
	test $$lock_status -eq 0 -a $$newest_status -eq 0

test-lock: setup
	$(LOCK_SUITE)

test-newest: setup-newest
	$(NEWEST_SUITE)

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"

demo: setup
	$(PYTHON) -m lavis_medblip.demo

app: setup
	$(PYTHON) -m lavis_medblip.app

clean:
	rm -rf .venv .venv-newest .cache
