#!/usr/bin/env bash
# Creates .venv with the pinned CPU build of PyTorch first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then wanmoe itself. `bash scripts/setup.sh dev` adds the test tools and the
# test-only oracles (the official `wan22` package and `diffusers`) and installs espeak-ng for speech tests and
# chromium + chromium-driver for the web app's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || pip install -q "torch==${WANMOE_TORCH:-2.13.0}"
if [ "${1:-}" = "dev" ]; then
  pip install -q -e ".[dev,media,eval,app]"
  # The official code is a test oracle only; its declared deps (flash_attn, torchvision) do not install on CPU.
  pip install -q --no-deps "wan22==2.2.11"
  if ! command -v espeak-ng >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) || echo "setup: espeak-ng not installed; speech tests use it when present" >&2
  fi
  # The web app's browser test drives Debian's Chromium through its own chromedriver (same version, one package).
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || echo "setup: chromium not installed; the browser test is skipped" >&2
  fi
else
  pip install -q -e ".[media]"
fi
