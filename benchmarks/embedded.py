"""Time `python generate.py` with no arguments (the embedded two-expert S2V model) on this machine.

Checks the output against issue 5's figures (>= 128x128, 16 fps, >= 4 s, with audio) and prints
`seconds=<wall time>` as its last line. Usage: python benchmarks/embedded.py [--threads N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads (default: all cores)")
    a = p.parse_args()
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "generate.py"), "--save_file", f"{d}/out.mp4", "--quiet"],
                       check=True, env=env, cwd=d)
        wall = time.perf_counter() - t0
        from wanmoe.media import probe_video

        info = probe_video(f"{d}/out.mp4")
    seconds = info["frames"] / info["fps"]
    ok = info["width"] >= 128 and info["height"] >= 128 and info["fps"] == 16 and seconds >= 4.0
    print(f"video: {info['width']}x{info['height']}, {info['frames']} frames at {info['fps']} fps = {seconds:.2f} s, "
          f"audio {info['audio_duration']:.2f} s; meets size/fps/length: {ok}")
    print(f"seconds={wall:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
