# Every target sets up what it needs first (idempotent, a few seconds when up to date).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-fast lint bench

setup:
	scripts/setup.sh all

demo: setup
	.venv/bin/lancetag demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow and not vllm"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m bench
