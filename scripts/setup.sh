#!/usr/bin/env bash
# Create or update the environments from the pinned locks. Idempotent: a second run
# only checks (one to two seconds per environment); uv's cache makes a fresh clone fast too.
#
#   scripts/setup.sh            all three (.venv core/training, .venv-vllm labeling, .venv-webui)
#   scripts/setup.sh core       only .venv
#   scripts/setup.sh vllm       only .venv-vllm
#   scripts/setup.sh webui      only .venv-webui: LlamaBoard (gradio cannot share .venv with Ray Serve)
#   LANCETAG_VLLM=gpu scripts/setup.sh vllm   GPU clusters: the CUDA build of vLLM
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
PYTHON_VERSION=3.11
VLLM_BUILD="${LANCETAG_VLLM:-cpu}"
what="${1:-all}"

ensure_uv() {
  if command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    UV=uv; return
  fi
  local tools=.cache/tools
  if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q "uv==$UV_VERSION"
  fi
  UV="$tools/bin/uv"
}

sync_env() {  # sync_env VENV LOCK
  local venv=$1 lock=$2
  [ -x "$venv/bin/python" ] || "$UV" venv -q --python "$PYTHON_VERSION" "$venv"
  # sync removes what the lock does not list: the environment is exactly the lock.
  # Bytecode compiled once here (~40 s on a fresh environment, ~1 s after): uv skips it by
  # default, and with PYTHONDONTWRITEBYTECODE set every process (each Ray worker, each CLI
  # call) would compile torch/transformers/ray again: 25 s -> 11 s to import the stack.
  "$UV" pip sync -q --compile-bytecode -p "$venv/bin/python" "$lock"
  "$UV" pip install -q -p "$venv/bin/python" --no-deps -e .
  echo "setup: $venv matches $lock"
}

ensure_system_packages() {  # headless Chromium: the eval report and web UI tests
  command -v chromium >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium not found; the HTML report test will be skipped (apt-get install chromium)" >&2
  fi
}

ensure_uv
[ "$what" = vllm ] || ensure_system_packages
case "$what" in
  core) sync_env .venv requirements/core.lock ;;
  vllm) sync_env .venv-vllm "requirements/vllm-$VLLM_BUILD.lock" ;;
  webui) sync_env .venv-webui requirements/webui.lock ;;
  all)
    sync_env .venv requirements/core.lock
    sync_env .venv-vllm "requirements/vllm-$VLLM_BUILD.lock"
    sync_env .venv-webui requirements/webui.lock ;;
  *) echo "usage: scripts/setup.sh [all|core|vllm|webui]" >&2; exit 2 ;;
esac
