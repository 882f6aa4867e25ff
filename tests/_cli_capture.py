"""The real command line, with the muxer also writing the frames it receives (`<file>.frames.safetensors`).

Tests run it (also under torchrun) to compare generated tensors rather than re-encoded H.264.
"""

import sys

import torch
from safetensors.torch import save_file

from wanmoe import media
from wanmoe.cli import generate_main

_add, _close = media.VideoWriter.add, media.VideoWriter.close


def _add_keeping(self, video):  # noqa: ANN001, ANN202
    self.__dict__.setdefault("kept", []).append(video.clone())
    return _add(self, video)


def _close_saving(self, sidecar=None):  # noqa: ANN001, ANN202
    out = _close(self, sidecar)
    save_file({"frames": torch.cat(self.kept, dim=1).contiguous()}, f"{self.dest}.frames.safetensors")
    return out


media.VideoWriter.add, media.VideoWriter.close = _add_keeping, _close_saving

if __name__ == "__main__":
    sys.exit(generate_main())
