"""The real command line, with `Video.save` also writing the frames it muxes (`<file>.frames.safetensors`).

Tests run it (also under torchrun) to compare generated tensors rather than re-encoded H.264.
"""

import sys

from safetensors.torch import save_file

from wanmoe import api
from wanmoe.cli import generate_main

_save = api.Video.save


def _save_with_frames(self, path, **kw):  # noqa: ANN001, ANN003, ANN202
    out = _save(self, path, **kw)
    save_file({"frames": self.frames.contiguous()}, f"{path}.frames.safetensors")
    return out


api.Video.save = _save_with_frames

if __name__ == "__main__":
    sys.exit(generate_main())
