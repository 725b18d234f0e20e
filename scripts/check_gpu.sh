#!/usr/bin/env bash
# The CUDA paths, on a machine with a GPU: the gpu-marked tests (tests/gpu), then one
# summary line. Takes a few minutes on one GPU; record its line in docs/benchmarks.md.
#   bash scripts/check_gpu.sh            # uses .venv/bin/python, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "check_gpu: no CUDA device visible to torch; nothing run" >&2
    exit 2
fi
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0), '×', torch.cuda.device_count())")
torch_version=$("$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)")
start=$(date +%s)
"$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee /tmp/check_gpu.log
status=${PIPESTATUS[0]}
summary=$(grep -E "[0-9]+ (passed|failed)" /tmp/check_gpu.log | tail -1)
echo "check_gpu: ${summary:-no result} in $(( $(date +%s) - start )) s on ${device} (torch ${torch_version})"
exit "$status"
