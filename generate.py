#!/usr/bin/env python
"""Drop-in for the official `python generate.py --task ... --size ... --ckpt_dir ...`.

With no arguments it runs the embedded speech-to-video model that ships inside the package.
"""

import sys
from pathlib import Path

try:
    from wanmoe.cli import generate_main
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from wanmoe.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
