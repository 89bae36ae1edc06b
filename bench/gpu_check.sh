#!/usr/bin/env bash
# The GPU path of half precision, checked in one go on a machine with a CUDA GPU, in under five
# minutes: the CUDA tests (which skip on machines without CUDA, as CI is), then images/s of the
# shipped model at its defaults in fp32, bf16 and fp16 (and auto), side by side, with
# torch.compile of the UNet as a further row. Run from anywhere:
#
#     bench/gpu_check.sh                 # PYTHON=... to use another interpreter
#
# Paste its output (the GPU, the test summary and the table) into the issue.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s); nothing to check" % torch.__version__)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
PYEOF

echo "== CUDA tests"
# -k cuda picks the tests that need a GPU; -rs shows why any was skipped.
timeout 60 "$PY" -m pytest -q -p no:randomly -p no:cacheprovider -rs -k cuda \
    tests/core/test_precision.py

echo "== Speed: images/s at the defaults (32 two-object images per call, median of 5 rounds)"
timeout 120 "$PY" bench/bench_precision.py --device cuda --precisions fp32,bf16,fp16,auto \
    --rounds 5 --batch 32

echo "== torch.compile of the UNet, at the precision auto picks (its first call includes the build)"
timeout 100 "$PY" bench/bench_precision.py --device cuda --precisions auto --no-old-defaults \
    --rounds 3 --batch 32 --compile || echo "gpu_check: the torch.compile run failed or ran out of time"
