# Every target sets up what it needs first (idempotent, a few seconds when up to date).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-long test-all test-fast lint bench

setup:
	scripts/setup.sh all

demo: setup
	.venv/bin/lancetag demo

# The default run (CI): everything but the tests marked `long` (22-24 min on 2 slow cores).
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest tests -m "not long"

# The long tests: multi-node clusters with node kills, the whole demo, job submission, second paths.
test-long: setup
	$(PY) -m pytest tests -m long

test-all: setup
	$(PY) -m ruff check .
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow and not vllm"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m bench
