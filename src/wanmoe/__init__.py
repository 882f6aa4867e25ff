"""wanmoe: video generation with noise experts (the Wan2.2 design).

    import wanmoe
    pipe = wanmoe.load("s2v-mini")                # a task name, or a checkpoint folder
    video = pipe(prompt="...", image="ref.png", audio="talk.wav", steps=20, seed=0)
    video.save("out.mp4")                          # mp4 with sound + JSON sidecar

Importing the package has no side effects and stays light: the API is imported on first use.
"""

from __future__ import annotations

from wanmoe.version import __version__

_API = ("load", "Pipeline", "Video", "InputError", "Request", "LoadOptions")
__all__ = ["__version__", *_API]


def __getattr__(name: str):  # noqa: ANN202 (module attribute hook, PEP 562)
    if name in _API:
        from wanmoe import api

        return getattr(api, name)
    raise AttributeError(f"module 'wanmoe' has no attribute {name!r}")
