#!/usr/bin/env bash
# Reproduces the embedded s2v-mini model (the one in src/wanmoe/assets/s2v-mini) on a 2-core CPU.
# Each stage is resumable; the VAE recipe below is the one the shipped VAE went through (see docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${OUT:-runs/mini}
MIN=${MIN:-42}        # minutes per expert (the three run side by side, one thread each)
STEPS=${STEPS:-1300}
python -m wanmoe.train.cli clips --out "$OUT" --n 240
# VAE: short clips first (fast), then longer clips so late frames of a 4 s clip decode well.
python -m wanmoe.train.cli vae --out "$OUT" --threads 2 --phases "500:5:48:4:1e-3:sample,1800:5:48:4:6e-4,2000:17:32:3:4e-4,2400:49:24:2:4e-4"
python -m wanmoe.train.cli latents --out "$OUT" --n 160 --threads 2
for e in high low dense; do
  python -m wanmoe.train.cli expert --out "$OUT" --expert "$e" --steps "$STEPS" --max_minutes "$MIN" --threads 1 --quiet &
done
wait
python -m wanmoe.train.cli export --out "$OUT" --dest src/wanmoe/assets/s2v-mini
