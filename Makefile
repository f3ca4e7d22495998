# One bootstrap builds .venv from nothing (idempotent); test and demo call it when needed.
PYTHON := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-fast demo app clean

setup:
	bash scripts/bootstrap.sh

test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"

demo: setup
	$(PYTHON) -m lavis_medblip.demo

app: setup
	$(PYTHON) -m lavis_medblip.app

clean:
	rm -rf .venv .cache
