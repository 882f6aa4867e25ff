"""Peak memory of `generate.py` (the embedded S2V model) against the length of the audio.

The command line streams each decoded clip into the mp4 and keeps no frames, so the peak resident memory should
not grow with the audio: this runs the same generation on audio of each length (the shipped example speech,
repeated) in a fresh process each, and prints the peak RSS per length and, as its last line,
`rss_growth=<peak at the longest / peak at the shortest>`.

Usage: python benchmarks/long_audio.py [--seconds 15 60] [--steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys
from wanmoe.cli import generate_main
rc = generate_main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[15.0, 60.0])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the task's)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    from wanmoe import media
    from wanmoe.configs import PRESETS

    example = media.read_audio(PRESETS["s2v-mini"].example_files()["audio"])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for sec in a.seconds:
            n = int(sec * 16000)
            audio = np.tile(example, n // len(example) + 1)[:n]
            wav = Path(d) / f"a{sec:g}.wav"
            with wave.open(str(wav), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
            out = Path(d) / f"v{sec:g}.mp4"
            args = ["--audio", str(wav), "--base_seed", "0", "--quiet", "--save_file", str(out)]
            if a.steps:
                args += ["--sample_steps", str(a.steps)]
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            peak_kb = int(next(ln for ln in r.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")).split()[1])
            side = json.loads(out.with_suffix(".json").read_text())
            rows.append((sec, side["frames"], side["timings"]["clips"], peak_kb / 1024, wall))
            print(f"audio {sec:5.1f} s: {side['frames']} frames in {side['timings']['clips']} clips, "
                  f"peak RSS {peak_kb / 1024:.0f} MiB, {wall:.1f} s", flush=True)
    print(f"rss_growth={rows[-1][3] / rows[0][3]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
