"""The live preview the web app shows: `pipe(..., preview=fn)` streams each step's x0 prediction and every decoded
frame as soon as the VAE makes it; the streamed frames are exactly the video's, in order, and arrive in several
groups per clip (so the first frames are on screen long before the decode ends). Also the app's latent-to-RGB map."""

from __future__ import annotations

import pytest
import torch

import wanmoe
from wanmoe.pipeline import Preview


@pytest.mark.parametrize(("task", "kwargs"), [
    ("s2v-tiny", {"infer_frames": 8, "image": "ref.png", "audio": "short.wav"}),  # 2 clips: clip 0 drops frames
    ("t2v-tiny", {"frame_num": 9, "size": "64*48"}),
])
def test_preview_streams_the_videos_frames(task, kwargs, tiny_ckpt, media_dir):
    pipe = wanmoe.load(tiny_ckpt(task))
    kw = {k: media_dir / v if k in ("image", "audio") else v for k, v in kwargs.items()}
    seen: list[Preview] = []
    video = pipe("a cat", seed=1, steps=2, preview=seen.append, **kw)
    lat = [p for p in seen if p.latent is not None]
    groups = [p for p in seen if p.frames is not None]
    clips = lat[0].clips
    assert [(p.clip, p.step) for p in lat] == [(r, i) for r in range(clips) for i in (1, 2)]
    assert lat[0].latent.ndim == 5 and torch.isfinite(lat[0].latent).all()
    for r in range(clips):
        assert sum(1 for g in groups if g.clip == r) >= 2, "frames must stream during the decode, not at its end"
    streamed = torch.cat([g.frames for g in groups], dim=1)
    assert torch.equal(streamed, video.frames)  # exactly the video, nothing dropped or repeated
    # Order of events: a clip's latent previews come before its frames.
    kinds = [("f" if p.frames is not None else "l", p.clip) for p in seen]
    assert kinds.index(("f", 0)) > max(i for i, k in enumerate(kinds) if k == ("l", 0))
    again = pipe("a cat", seed=1, steps=2, **kw)  # without a preview: same frames (the hook leaves nothing behind)
    assert torch.equal(again.frames, video.frames)
    assert not pipe.components.vae.decoder._forward_hooks


@pytest.mark.parametrize("first_cut", [3, 0])  # S2V clip 0 keeps 1 of its first group's 4 frames; later clips all
def test_rgb_map_learns_from_streamed_groups(first_cut):
    """Synthetic decodes made by a known linear map, streamed the way the pipeline streams them: the fit recovers
    the map, so group k must have been paired with the right latent frame."""
    from wanmoe.app.preview import RGBFit, frames_uint8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(17, 3, generator=g) * 0.3
    fit = RGBFit(ridge=1e-6)
    for clip in range(2):
        z = torch.randn(1, 16, 6, 4, 4, generator=g)  # (1, C, F, H, W)
        a = torch.cat([z[0].permute(1, 2, 3, 0), torch.ones(6, 4, 4, 1)], dim=-1)  # (F, H, W, C + 1)
        col = (a @ w).permute(3, 0, 1, 2)  # (3, F, H, W): each latent pixel's colour
        frames = col.repeat_interleave(8, 2).repeat_interleave(8, 3)  # (3, F, 32, 32)
        groups = [frames[:, :1].expand(3, 4 - first_cut, 32, 32)] + [frames[:, i : i + 1].expand(3, 4, 32, 32)
                                                                     for i in range(1, 6)]
        groups = groups[1:] if clip == 1 else groups  # a clip whose first kept group is its second latent frame
        assert fit.add(z, groups, 8)
    got = fit.map()
    assert torch.allclose(got.weight, w, atol=1e-4)
    img = got(z)  # (F, H, W, 3) uint8
    assert img.shape == (6, 4, 4, 3) and (torch.from_numpy(img[1:]).float() - torch.from_numpy(
        frames_uint8(frames[:, 1:, ::8, ::8]))).abs().max() <= 1
    assert not fit.add(z, groups * 2, 8)  # more groups than latent frames: not this layout, nothing learned
