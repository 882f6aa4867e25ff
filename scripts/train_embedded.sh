#!/usr/bin/env bash
# Reproduces the embedded s2v-mini model (the one in src/wanmoe/assets/s2v-mini) on a 2-core CPU: rounds 1 to 5
# here (a VAE with a 16-channel latent), round 6 (fresh clips and continuation clips) in scripts/train_continuation.sh,
# which starts from the weights this script exports, and round 8 (a 32-channel VAE, the experts widened to it and
# retrained) in scripts/train_embedded_v2.sh; see docs/results.md. Each stage is resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${OUT:-runs/mini}     # round 1
OUT2=${OUT2:-runs/v2}     # round 2 (mouth-aware VAE, experts continued from round 1)
MIN=${MIN:-42}            # minutes per expert and round (the three run side by side, one thread each)
STEPS=${STEPS:-2400}
STEPS2=${STEPS2:-3000}
train() { python -m wanmoe.train.cli "$@"; }
# continue_experts OUT INIT STEPS MINUTES LR LATENTS EXPERT...: each expert continues from INIT/experts/<e>.pt
# (EMA weights) with the lip-region loss, side by side, one thread each.
continue_experts() {
  local out=$1 init=$2 steps=$3 minutes=$4 lr=$5 latents=$6 e
  shift 6
  for e in "$@"; do
    train expert --out "$out" --expert "$e" --steps "$steps" --max_minutes "$minutes" --threads 1 --quiet \
      --lr "$lr" --init "$init/experts/$e.pt" --mouth_weight 1 --latents "$latents" &
  done
  wait
}

# Round 1. VAE: short clips first (fast), then longer clips so late frames of a 4 s clip decode well.
train clips --out "$OUT" --n 240
train vae --out "$OUT" --z_dim 16 --threads 2 --phases "500:5:48:4:1e-3:sample,1800:5:48:4:6e-4,2000:17:32:3:4e-4,2400:49:24:2:4e-4"
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
train vae --out "$OUT2" --z_dim 16 --threads 2 --phases "4000:69:48:1:3e-4:mouth"
train latents --out "$OUT2" --n 160 --threads 2
continue_experts "$OUT2" "$OUT" "$STEPS2" "$MIN" 3e-4 "$OUT2/latents.pt" high low dense

# Round 3: real espeak-ng speech. 48 speech clips (seeds 500000+), encoded with the round-2 VAE; the three
# models continue 700 steps on the procedural + speech latents.
OUT3=${OUT3:-runs/v3}
SP3=${SP3:-runs/v3sp}
SP4=${SP4:-runs/v4sp}
OUT4=${OUT4:-runs/v4}
OUT5=${OUT5:-runs/v5}
mkdir -p "$OUT3" "$SP3" "$SP4" "$OUT4" "$OUT5/experts"
for d in "$OUT3" "$SP3" "$SP4" "$OUT4" "$OUT5"; do ln -sfn "$(realpath "$OUT2/vae")" "$d/vae"; done
train clips --out "$SP3" --speech espeak --n 48 --start 500000 --threads 2
train latents --out "$SP3" --n 48 --threads 2
continue_experts "$OUT3" "$OUT2" 700 10 1.5e-4 "$OUT2/latents.pt,$SP3/latents.pt" high low dense

# Round 4: 240 more speech clips (seeds 510000+); the three models continue about 2560 steps (42 min) on
# 160 procedural + 288 speech clips.
LAT="$OUT2/latents.pt,$SP3/latents.pt,$SP4/latents.pt"
train clips --out "$SP4" --speech espeak --n 240 --start 510000 --threads 2
train latents --out "$SP4" --n 240 --threads 2
continue_experts "$OUT4" "$OUT3" 2600 42 2e-4 "$LAT" high low dense

# Round 5: the low-noise expert followed real speech less well than the baseline did over the same sigmas
# (docs/results.md), so it and the baseline continue 1800 more steps each (same data); the high-noise expert
# is round 4's.
continue_experts "$OUT5" "$OUT4" 1800 31 1.5e-4 "$LAT" low dense
cp -n "$OUT4/experts/high.pt" "$OUT5/experts/high.pt"
train export --out "$OUT5" --dest src/wanmoe/assets/s2v-mini

# Step distillation (the shipped --distilled option, docs/lora.md): a LoRA per expert for 2 Euler steps that land
# on the shipped model's 20-step states.
train distill --out runs/distill --steps_fast 2 --n 96 --steps 1500 --rank 16 --batch 2 --max_minutes 20 --eval_n 4 \
  --threads 1
for e in high low; do cp runs/distill/fast_$e.safetensors "src/wanmoe/assets/loras/s2v-mini_distill2_$e.safetensors"; done
