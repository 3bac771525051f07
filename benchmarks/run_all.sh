#!/usr/bin/env bash
# The ssl_ae runs behind docs/experiments/2026-11-ssl_ae-cpu-default.md: CPU defaults, then learning-curve
# points (shorter schedules) so the trend with training time is visible. Rows are appended to
# runs/bench/benchmarks.md. Usage: benchmarks/run_all.sh [DATA_ROOT]
set -euo pipefail
DATA=${1:-../shared/data}
A="anomap bench --method ssl_ae --out runs/bench/benchmarks.md --runs-dir runs/bench"
$A --data "$DATA/mpdd_metal_plate" "$DATA/magnetic_tile"
for e in 30 150; do
  $A --data "$DATA/mpdd_metal_plate" --set min_steps=0 --set epochs=$e --runs-dir runs/bench-e$e --label "learning curve"
done
for e in 5 15; do
  $A --data "$DATA/magnetic_tile" --set min_steps=0 --set epochs=$e --runs-dir runs/bench-e$e --label "learning curve"
done
