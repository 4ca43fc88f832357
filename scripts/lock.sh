#!/usr/bin/env bash
# Re-resolve the pinned locks from requirements/*.in. Run after editing an .in file and
# commit the locks: setup installs exactly what they list.
#
#   scripts/lock.sh             every lock
#   scripts/lock.sh webui core  only these (names as in requirements/NAME.lock)
set -euo pipefail
cd "$(dirname "$0")/../requirements"
compile() {  # compile IN OVERRIDES|"" OUT [more uv pip compile options]
  local in=$1 overrides=$2 out=$3
  shift 3
  uv pip compile "$in" ${overrides:+--override "$overrides"} --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --generate-hashes -q -o "$out" "$@"
}
# .venv-webui takes core.lock's version of every package the two environments share, except
# those gradio 5.50 forces apart (starlette<1, pydantic<=2.12.3, pillow<12, websockets<16).
WEBUI_UNSHARED='starlette|pydantic|pydantic-core|pillow|websockets'
compile_webui() {  # the pins file keeps a fixed name: the lock's "via" notes cite it
  local pins=core.lock.pins
  trap 'rm -f core.lock.pins' EXIT
  grep -oE '^[A-Za-z0-9_.-]+==[^ ]+' core.lock | grep -viE "^($WEBUI_UNSHARED)==" >"$pins"
  compile webui.in "" webui.lock -c "$pins" \
    --custom-compile-command "scripts/lock.sh webui  # webui.in, -c core.lock.pins: core.lock less $WEBUI_UNSHARED"
}
wanted() { [ ${#SELECTED[@]} -eq 0 ] || [[ " ${SELECTED[*]} " == *" $1 "* ]]; }
SELECTED=("$@")
wanted core && compile core.in core-overrides.txt core.lock
wanted vllm-cpu && compile vllm-cpu.in vllm-cpu-overrides.txt vllm-cpu.lock
wanted vllm-gpu && compile vllm-gpu.in vllm-gpu-overrides.txt vllm-gpu.lock
wanted train-gpu && compile train-gpu.in core-overrides.txt train-gpu.lock
wanted webui && compile_webui  # after core: it reads core.lock
true
