#!/usr/bin/env bash
# One device call for issue 6: build growops_cuda, run the GPU tests, benchmark shared layers (< 8 min on an H100).
#   run (device tool): bash benchmarks/device_shared_layer.sh       (no carry needed)
# A cold JIT build takes about 70 s; everything lands in $OUT (build log, test log, benchmark table and JSON).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
# 1. Build and self-check (verbose: the compiler's own output goes to the log).
timeout 240 python3 -c "
import time; t = time.time()
from growops.ops import extension as e
m = e.load(verbose=True)
print('growops_cuda:', e.status(), f'({time.time() - t:.0f} s)')
" > "$OUT/build.log" 2>&1
tail -n 5 "$OUT/build.log"
# 2. Correctness on the GPU (the same tests skip on CPU machines).
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_ops_extension.py tests/test_ops_shared_linear.py \
    tests/test_ops_routing.py 2>&1 | tee "$OUT/tests.log" | tail -n 15
# 3. The benchmark: quick first (so something comes back), then the full table.
timeout 60 python3 benchmarks/shared_layer.py --quick --reps 5 2>&1 | tee "$OUT/quick.md"
timeout "${BENCH_SECONDS:-240}" python3 benchmarks/shared_layer.py --out "$OUT/shared_layer.json" 2>&1 \
    | tee "$OUT/shared_layer.md"
ls -la "$OUT"
