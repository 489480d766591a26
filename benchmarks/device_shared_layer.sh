#!/usr/bin/env bash
# One device call for issue 6: build growops_cuda, run the GPU tests, benchmark shared layers.
#   run (device tool): bash benchmarks/device_shared_layer.sh     with timeout_s 540 (no carry needed)
# Budget: build <= 200 s (a cold JIT build takes about 70 s), tests <= 90 s, quick benchmark <= 40 s, full table
# <= 180 s: 510 s at most. Everything lands in $OUT (build log, test log, benchmark tables and JSON).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
# 1. Build and self-check (verbose: the compiler's own output goes to the log).
timeout 200 python3 -c "
import time; t = time.time()
from growops.ops import extension as e
e.load(verbose=True)
print('growops_cuda:', e.status(), f'({time.time() - t:.0f} s)')
" > "$OUT/build.log" 2>&1
tail -n 5 "$OUT/build.log"
# A build killed by its timeout leaves torch's lock file behind, and the next load would wait on it forever.
rm -f "$TORCH_EXTENSIONS_DIR"/*/lock
# 2. Correctness on the GPU (the same tests skip on CPU machines).
timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_ops_extension.py tests/test_ops_shared_linear.py \
    tests/test_ops_routing.py 2>&1 | tee "$OUT/tests.log" | tail -n 15
# 3. The benchmark: quick first (so something comes back), then the full table if the kernel loaded (without it,
#    the quick table already shows the reference path against PyTorch's).
timeout 40 python3 benchmarks/shared_layer.py --quick --reps 5 2>&1 | tee "$OUT/quick.md"
if grep -q "growops_cuda: loaded" "$OUT/build.log"; then
    timeout "${BENCH_SECONDS:-180}" python3 benchmarks/shared_layer.py --reps 8 --out "$OUT/shared_layer.json" 2>&1 \
        | tee "$OUT/shared_layer.md"
fi
ls -la "$OUT"
