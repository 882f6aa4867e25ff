"""The user's media as tensors: paths, PIL images, numpy arrays or tensors in; checked `Inputs` out.

Every check happens here, before any model loads: missing or unreadable files, images too small, too large
(decompression bombs are refused from the header, before decoding) or of unusual bit depth, audio that is
empty, shorter than one video frame, silent, non-finite or of absurd amplitude. Errors are `InputError`s
naming the input (`image`, `audio`, `pose_video`).

Axis legend: Hp/Wp pixel height/width, T pixel frames, N audio samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wanmoe.configs import PipelineConfig
from wanmoe.request import InputError

AUDIO_SR = 16000  # every audio encoder here hears 16 kHz mono
MIN_SIDE = 32  # pixels: below this no preset has anything to look at
MAX_PIXELS = 8192 * 8192  # decompression-bomb limit, checked from the header before decoding
MAX_AUDIO_S = 3600.0
MAX_PEAK = 4.0  # float samples are expected in [-1, 1]; int16 PCM passed as float peaks near 32768


@dataclass
class Inputs:
    image: Tensor | None = None  # (3, Hp, Wp) float32 in [-1, 1]
    audio: np.ndarray | None = None  # (N,) float32 mono at `sr`
    sr: int = AUDIO_SR
    pose: Tensor | None = None  # (3, T, Hp, Wp) in [-1, 1]
    sources: dict[str, str] | None = None  # input name -> where it came from (path or "array"), for the sidecar


# ----------------------------------------------------------------------------------------------- images


def _pil_to_tensor(im) -> Tensor:  # noqa: ANN001 (PIL.Image.Image)
    """Any PIL mode -> (3, Hp, Wp) in [-1, 1]; 16-bit and float images are scaled, not clipped to white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            peak = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        else:  # 16-bit samples (PIL opens 16-bit PNGs as "I" or "I;16")
            peak = 65535.0 if a.size and a.max() > 255 else 255.0
        if not np.isfinite(a).all():
            raise InputError("image", "has non-finite pixels")
        g = np.clip(a / peak, 0.0, 1.0)
        rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32)  # (Hp, Wp, 3) in [0, 1]
        return torch.from_numpy(rgb).permute(2, 0, 1) * 2.0 - 1.0
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        from PIL import Image

        # Transparent pixels become white, as an image viewer shows them, not whatever colour they store.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (Hp, Wp, 3)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def _check_image_size(w: int, h: int, where: str) -> None:
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError("image", f"{where} is {w}x{h}: at least {MIN_SIDE}x{MIN_SIDE} pixels are needed")
    if w * h > MAX_PIXELS:
        raise InputError("image", f"{where} is {w}x{h} ({w * h / 1e6:.0f} MP): at most {MAX_PIXELS / 1e6:.0f} MP "
                                  "are accepted")


def load_image(image: object) -> Tensor:
    """Path, PIL image, numpy (Hp, Wp, 3) uint8 or float in [0, 1], or tensor (3, Hp, Wp) in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        p = Path(image)
        if not p.is_file():
            raise InputError("image", f"file not found: {str(p)!r}")
        try:
            with Image.open(p) as im:  # reads the header only: the size is checked before anything is decoded
                _check_image_size(*im.size, where=repr(str(p)))
                return _pil_to_tensor(im)
        except Image.DecompressionBombError as e:  # Pillow's own header check, far above MAX_PIXELS
            raise InputError("image", f"{str(p)!r} is too large ({e}); at most {MAX_PIXELS / 1e6:.0f} MP are "
                                      "accepted") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError("image", f"cannot read {str(p)!r} as an image: {e}") from None
    if type(image).__module__.startswith("PIL."):
        _check_image_size(*image.size, where="the PIL image")
        return _pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise InputError("image", f"array must be (H, W, 3) RGB, got shape {a.shape}")
        a = a[..., :3]
        if a.dtype == np.uint8:
            x = torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
                raise InputError("image", "float arrays must be finite and in [0, 1]")
            x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1) * 2.0 - 1.0
        else:
            raise InputError("image", f"array dtype must be uint8 or float, got {a.dtype}")
        _check_image_size(a.shape[1], a.shape[0], where="the array")
        return x
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError("image", f"tensor must be (3, H, W), got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            x = image.float() / 127.5 - 1.0
        elif image.is_floating_point():
            x = image.detach().float().cpu()
            if not torch.isfinite(x).all() or x.min() < -1.0 or x.max() > 1.0:
                raise InputError("image", "float tensors must be finite and in [-1, 1]")
        else:
            raise InputError("image", f"tensor dtype must be uint8 or float, got {image.dtype}")
        _check_image_size(x.shape[2], x.shape[1], where="the tensor")
        return x.cpu()
    raise InputError("image", f"must be a path, PIL image, numpy array or tensor, got {type(image).__name__}")


# ----------------------------------------------------------------------------------------------- audio


def _resample(a: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Resample float mono through PyAV's swresample (the same resampler that decodes files)."""
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(a[None], dtype=np.float32), format="fltp", layout="mono")
    frame.sample_rate = sr
    res = av.AudioResampler(format="fltp", layout="mono", rate=target)
    out = [f.to_ndarray()[0] for f in res.resample(frame)] + [f.to_ndarray()[0] for f in res.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def load_audio(audio: object, sr: int | None = None, *, fps: int = 16) -> np.ndarray:
    """Path, numpy/tensor (N,) float in [-1, 1] (with `sr`, default 16 kHz), or (array, sr) -> 16 kHz float32."""
    from wanmoe import media

    if isinstance(audio, tuple) and len(audio) == 2:
        audio, sr = audio
    if isinstance(audio, (str, os.PathLike)):
        try:
            a = media.read_audio(audio, sr=AUDIO_SR)
        except ValueError as e:
            raise InputError("audio", f"({audio}): {e}") from None
        name = repr(str(audio))
    elif isinstance(audio, (np.ndarray, Tensor)):
        a = audio.detach().cpu().numpy() if isinstance(audio, Tensor) else audio
        if a.ndim == 2 and 1 in a.shape:
            a = a.reshape(-1)
        if a.ndim != 1:
            raise InputError("audio", f"array must be mono (N,), got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise InputError("audio", f"array must hold float samples in [-1, 1], got {a.dtype}")
        a = a.astype(np.float32)
        rate = AUDIO_SR if sr is None else sr
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= 384000:
            raise InputError("audio", f"sample rate must be an integer in [1000, 384000] Hz, got {rate!r}")
        if not np.isfinite(a).all():
            raise InputError("audio", "has non-finite samples")
        if a.size and rate != AUDIO_SR:
            a = _resample(a, rate, AUDIO_SR)
        name = "the array"
    else:
        raise InputError("audio", "must be a path, a numpy array or tensor, or (array, sr); "
                                  f"got {type(audio).__name__}")
    if not np.isfinite(a).all():
        raise InputError("audio", f"{name} has non-finite samples")
    seconds = a.size / AUDIO_SR
    if seconds < max(0.1, 1.0 / fps):
        raise InputError("audio", f"{name} lasts {seconds:.3f} s: at least 0.1 s (and one video frame) is needed")
    if seconds > MAX_AUDIO_S:
        raise InputError("audio", f"{name} lasts {seconds:.0f} s: at most {MAX_AUDIO_S:.0f} s are accepted")
    peak = float(np.abs(a).max())
    if peak > MAX_PEAK:
        raise InputError("audio", f"{name} peaks at {peak:.4g}: samples must be floats in [-1, 1] "
                                  "(16-bit PCM? divide by 32768)")
    if media.audio_is_silent(a):
        raise InputError("audio", f"{name} is silent: nothing to drive the video")
    return a


# ----------------------------------------------------------------------------------------------- all inputs


def read_inputs(cfg: PipelineConfig, *, image: object = None, audio: object = None, sr: int | None = None,
                pose_video: object = None, tts_text: str | None = None, tts_voice: str | None = None) -> Inputs:
    """The inputs a task needs, read and checked; the embedded task falls back to its example image and audio.
    `tts_text` is spoken by espeak-ng (wanmoe.tts) and drives the video in place of `audio`."""
    sources: dict[str, str] = {}
    s2v = cfg.modality == "s2v"
    if not s2v:
        for name, v in (("audio", audio), ("pose_video", pose_video), ("tts_text", tts_text)):
            if v is not None:
                raise InputError(name, f"only applies to s2v tasks, not {cfg.task}")
    if tts_text is not None:
        if audio is not None:
            raise InputError("tts_text", "cannot be combined with audio: give the words to speak or the audio")
        from wanmoe import tts

        audio, sr = tts.speak(tts_text, voice=tts_voice, sr=AUDIO_SR), AUDIO_SR
        sources["audio"] = f"tts_text (espeak-ng, voice {tts_voice or 'default'}): {tts_text.strip()[:200]}"
    elif tts_voice is not None:
        raise InputError("tts_voice", "only applies with tts_text")
    if cfg.modality == "t2v" and image is not None:
        raise InputError("image", f"does not apply to {cfg.task} (text-to-video); use an i2v task")
    if s2v and cfg.embedded:
        ex_files = cfg.example_files()
        image = ex_files["image"] if image is None else image
        audio = ex_files["audio"] if audio is None else audio
    if cfg.modality in ("i2v", "s2v") and image is None:
        what = "the input image" if cfg.modality == "i2v" else "the reference image"
        raise InputError("image", f"is needed by {cfg.task} ({what})")
    if s2v and audio is None:
        raise InputError("audio", f"is needed by {cfg.task} (the driving speech)")
    out = Inputs(sources=sources)
    if image is not None:
        out.image = load_image(image)
        sources["image"] = str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__
    if audio is not None:
        out.audio = load_audio(audio, sr, fps=cfg.sample_fps)
        sources.setdefault("audio", str(audio) if isinstance(audio, (str, os.PathLike)) else "array")
    if pose_video is not None:
        if not isinstance(pose_video, (str, os.PathLike)):
            out.pose = pose_video
        else:
            from wanmoe import media

            try:
                out.pose = media.read_video(pose_video)[0]
            except ValueError as e:
                raise InputError("pose_video", f"({pose_video}): {e}") from None
            sources["pose_video"] = str(pose_video)
    return out
