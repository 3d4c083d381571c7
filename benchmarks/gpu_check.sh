#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with a CUDA device and torch, timm and lightning
# installed (the package itself runs from this checkout): the CUDA/bf16 tests, then the speed
# benchmarks in fp32 and bf16, the callback's share of an epoch, and insertion/deletion against
# the naive loop. Each result goes to $OUT (default benchmarks/results/gpu-run);
# benchmarks/results/gpu.md records such runs.
#
#     bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "== $1 ($(date -u +%T))"; }

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  $PY -c "import torch, timm, lightning, torchmetrics; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| timm', timm.__version__, '| lightning', lightning.__version__, '| torchmetrics', torchmetrics.__version__)"
  nproc; } 2>&1 | tee "$OUT/env.txt"

step "CUDA and bf16 tests"
timeout 240 $PY -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" | tail -n 15

step "speed, ViT-B/16 224, fp32"
timeout 150 $PY benchmarks/speed.py --device cuda --batch 32 --repeats 10 --standard-images 2 --threads 8 \
    --json "$OUT/speed-cuda-fp32.json" 2>/dev/null | tail -n 12

step "speed, ViT-B/16 224, bf16 autocast"
timeout 120 $PY benchmarks/speed.py --device cuda --batch 32 --repeats 10 --standard-images 2 --threads 8 \
    --precision bf16 --json "$OUT/speed-cuda-bf16.json" 2>/dev/null | tail -n 12

step "CAAPCallback's share of a ViT-B/16 epoch at Oxford-IIIT Pet's scale"
timeout 300 $PY benchmarks/callback_overhead_gpu.py >"$OUT/callback-overhead-gpu.json" 2>/tmp/callback-overhead-gpu.log
grep -h "overhead" /tmp/callback-overhead-gpu.log  # $OUT takes 8 files: the log stays behind

step "insertion/deletion against the naive loop, cuda"
timeout 120 $PY benchmarks/metrics_speed.py --device cuda --images 8 --batch-size 256 --naive-steps 20 \
    | tee "$OUT/metrics-speed-cuda.json"

step "insertion/deletion against the naive loop, cuda, TF32 matrix products in both"
timeout 120 $PY benchmarks/metrics_speed.py --device cuda --images 8 --batch-size 256 --naive-steps 20 --tf32 \
    | tee "$OUT/metrics-speed-cuda-tf32.json"

step "insertion/deletion against the naive loop, this machine's CPU ($(nproc) threads)"
timeout 120 $PY benchmarks/metrics_speed.py --device cpu --threads "$(nproc)" --images 1 --batch-size 64 --naive-steps 6 \
    | tee "$OUT/metrics-speed-cpu.json"
step "done"
