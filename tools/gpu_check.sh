#!/usr/bin/env bash
# The GPU check in one command: the CUDA test tier (tests/test_cuda.py), then the README's three
# headline benchmarks at reduced length (SiT-XL/2 bf16 training throughput and MFU at the largest
# batch that fits, 250-step guided sampling, scoring), printed as one Markdown table on stdout.
# Everything else it makes (test data, compiler and CUDA caches, logs, JSON) goes into one temporary
# directory, removed at the end (--keep keeps it and names it); progress and failing logs go to stderr.
#
#   bash tools/gpu_check.sh                        # one H100/H200: under 9 minutes
#   bash tools/gpu_check.sh --device cpu           # dry run on CPU: structure, skips and table
#   bash tools/gpu_check.sh > gpu_check.md         # keep the table
#
# PYTHON names the interpreter (default: python). Other flags: python tools/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
args=()
for a in "$@"; do
    if [ "$a" = "--keep" ]; then keep=1; else args+=("$a"); fi
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/d2c_gpu_check.XXXXXX")
if [ "$keep" = 1 ]; then
    trap 'echo "[gpu_check] files kept in $tmp" >&2' EXIT
else
    trap 'rm -rf "$tmp"' EXIT
fi
# every cache and temporary file of the children into $tmp: inductor, Triton, the CUDA JIT, torchrun
# and pytest's temporary directories, tempfile; and no __pycache__ in the repository
export TMPDIR="$tmp" TORCHINDUCTOR_CACHE_DIR="$tmp/inductor" TRITON_CACHE_DIR="$tmp/triton" \
    CUDA_CACHE_PATH="$tmp/nv" XDG_CACHE_HOME="$tmp/cache" MPLCONFIGDIR="$tmp/mpl" PYTHONDONTWRITEBYTECODE=1
status=0
"${PYTHON:-python}" tools/gpu_check.py --tmp "$tmp" ${args[@]+"${args[@]}"} || status=$?
exit $status
