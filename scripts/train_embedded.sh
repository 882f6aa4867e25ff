#!/usr/bin/env bash
# Reproduces the embedded s2v-mini model (the one in src/wanmoe/assets/s2v-mini) on a 2-core CPU, in two rounds
# (the shipped model went through both; see docs/results.md). Each stage is resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${OUT:-runs/mini}     # round 1
OUT2=${OUT2:-runs/v2}     # round 2 (mouth-aware VAE, experts continued from round 1)
MIN=${MIN:-42}            # minutes per expert and round (the three run side by side, one thread each)
STEPS=${STEPS:-2400}
STEPS2=${STEPS2:-3000}
train() { python -m wanmoe.train.cli "$@"; }

# Round 1. VAE: short clips first (fast), then longer clips so late frames of a 4 s clip decode well.
train clips --out "$OUT" --n 240
train vae --out "$OUT" --threads 2 --phases "500:5:48:4:1e-3:sample,1800:5:48:4:6e-4,2000:17:32:3:4e-4,2400:49:24:2:4e-4"
train latents --out "$OUT" --n 160 --threads 2
for e in high low dense; do
  train expert --out "$OUT" --expert "$e" --steps "$STEPS" --max_minutes "$MIN" --threads 1 --quiet &
done
wait

# Round 2. The VAE continues on whole 69-frame clips with mouth-centred crops and a lip-region loss (the round-1
# VAE blurred the mouth away, so no model could show it move); the latents are re-encoded and every expert
# (and the baseline) continues from its round-1 weights with a lip-region loss on the latent cells over the mouth.
mkdir -p "$OUT2/vae"
ln -sfn "$(realpath "$OUT/clips.pt")" "$OUT2/clips.pt"
[ -f "$OUT2/vae/vae_ckpt.pt" ] || cp "$OUT/vae/vae_ckpt.pt" "$OUT2/vae/"
train vae --out "$OUT2" --threads 2 --phases "4000:69:48:1:3e-4:mouth"
train latents --out "$OUT2" --n 160 --threads 2
for e in high low dense; do
  train expert --out "$OUT2" --expert "$e" --steps "$STEPS2" --max_minutes "$MIN" --threads 1 --quiet --lr 3e-4 \
    --init "$OUT/experts/$e.pt" --mouth_weight 1 &
done
wait
train export --out "$OUT2" --dest src/wanmoe/assets/s2v-mini

# Optional round 3 (measured in docs/results.md, not shipped): real espeak-ng speech clips. ROUND3=1 to run it.
if [ "${ROUND3:-0}" = 1 ]; then
  OUT3=${OUT3:-runs/v3}
  mkdir -p "$OUT3/sp" && ln -sfn "$(realpath "$OUT2/vae")" "$OUT3/vae" && ln -sfn "$(realpath "$OUT2/vae")" "$OUT3/sp/vae"
  train clips --out "$OUT3/sp" --speech espeak --n 48 --start 500000 --threads 2
  train latents --out "$OUT3/sp" --n 48 --threads 2
  for e in high low dense; do
    train expert --out "$OUT3" --expert "$e" --steps 700 --max_minutes 10 --threads 1 --quiet --lr 1.5e-4 \
      --init "$OUT2/experts/$e.pt" --mouth_weight 1 --latents "$OUT2/latents.pt,$OUT3/sp/latents.pt" &
  done
  wait
  train export --out "$OUT3" --dest "$OUT3/export"
fi
