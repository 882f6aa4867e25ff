"""Media I/O: read images and audio, write H.264 + AAC mp4 files atomically, probe them.

Axis legend: T pixel frames, H/W pixel height/width, C=3 colour channels.
Tensors in the library use (3, T, H, W) float in [-1, 1]; files on disk use uint8 (T, H, W, 3).
All third-party media libraries (PyAV, Pillow) are imported lazily inside the functions,
so `import wanmoe.media` works with the core dependencies only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "read_image",
    "read_audio",
    "audio_is_silent",
    "write_video",
    "write_video_with_sidecar",
    "read_video",
    "probe_video",
    "save_png",
    "to_uint8_frames",
]


def _require_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"file not found: {str(p)!r}")
    return p


# ----------------------------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as an RGB float tensor (3, H, W) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    p = _require_file(path)
    try:
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {str(p)!r}: {e}") from e
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()  # (3, H, W)
    return x / 127.5 - 1.0


def save_png(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Save one image: float (3, H, W) in [-1, 1] or uint8 (H, W, 3)."""
    from PIL import Image

    if isinstance(image, torch.Tensor) and image.dtype != torch.uint8:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"float image must be (3, H, W), got {tuple(image.shape)}")
        arr = to_uint8_frames(image[:, None])[0]  # (H, W, 3)
    else:
        arr = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"uint8 image must be (H, W, 3), got {arr.dtype} {arr.shape}")
    Image.fromarray(arr).save(Path(path), format="PNG")


# ----------------------------------------------------------------------------------------------- audio
def read_audio(path: str | os.PathLike, sr: int = 16000) -> np.ndarray:
    """Decode the first audio stream of any file PyAV can open (wav, mp3, mp4...) to float32 mono at `sr`.

    Raises ValueError for a missing file, a file without a decodable audio stream, or one with no samples.
    """
    import av

    if sr <= 0:
        raise ValueError(f"sr must be positive, got {sr}")
    p = _require_file(path)
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.audio:
                raise ValueError(f"no audio stream in {str(p)!r}")
            stream = container.streams.audio[0]
            # Planar float keeps the channels apart: (channels, n) per frame. We downmix by the channel mean
            # ourselves, as librosa.load(mono=True) does in the official pipeline; swresample's own stereo->mono
            # matrix would scale by 1/sqrt(2) per channel instead (+3 dB on correlated channels).
            resampler = av.AudioResampler(format="fltp", rate=sr)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))
            for out in resampler.resample(None):  # flush the resampler's delay line
                chunks.append(out.to_ndarray().mean(axis=0))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode audio from {str(p)!r}: {e}") from e
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise ValueError(f"audio file {str(p)!r} contains no samples")
    if not np.isfinite(audio).all():
        raise ValueError(f"audio file {str(p)!r} decoded to non-finite samples")
    return audio


def audio_is_silent(audio: np.ndarray, threshold_db: float = -60.0) -> bool:
    """True when the RMS level of `audio` (float, full scale 1.0) is below `threshold_db` dBFS."""
    a = np.asarray(audio, dtype=np.float64)
    if a.size == 0:
        return True
    rms = float(np.sqrt(np.mean(a * a)))
    return rms <= 10.0 ** (threshold_db / 20.0)


# ----------------------------------------------------------------------------------------------- video
def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] or uint8 (T, H, W, 3) -> contiguous uint8 (T, H, W, 3)."""
    if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
        video = video.cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"numpy video must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
        return np.ascontiguousarray(video)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"float video must be (3, T, H, W), got {tuple(video.shape)}")
    # Round (not truncate) so that a [-1, 1] -> uint8 -> [-1, 1] round trip is unbiased.
    x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return np.ascontiguousarray(x.permute(1, 2, 3, 0).cpu().numpy())  # (T, H, W, 3)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    # yuv420p subsamples chroma 2x2, so libx264 rejects odd sizes; replicate the last row/column.
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        log.warning("padding video from %dx%d to %dx%d for yuv420p", w, h, w + pw, h + ph)
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def _cut_to_shorter(frames: np.ndarray, audio: np.ndarray, fps: Fraction, sr: int) -> tuple[np.ndarray, np.ndarray]:
    # Same semantics as ffmpeg -shortest: whole video frames only, audio trimmed to exactly those frames.
    n_frames = min(len(frames), int(Fraction(len(audio)) * fps / sr))
    if n_frames == 0:
        raise ValueError(f"audio ({len(audio)} samples at {sr} Hz) is shorter than one video frame at {float(fps)} fps")
    n_samples = min(len(audio), round(Fraction(n_frames) * sr / fps))
    return frames[:n_frames], audio[:n_samples]


def _mux(path: str, frames: np.ndarray, fps: Fraction, audio: np.ndarray | None, sr: int, crf: int) -> None:
    import av

    _, h, w, _ = frames.shape
    with av.open(path, mode="w", format="mp4") as container:
        vs = container.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": str(crf), "preset": "medium"}
        aus = None
        if audio is not None:
            aus = container.add_stream("aac", rate=sr, layout="mono")
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            container.mux(vs.encode(frame))
        container.mux(vs.encode(None))
        if aus is not None:
            # The AAC encoder takes exactly frame_size samples per frame (a shorter last one is allowed).
            n = aus.codec_context.frame_size or 1024
            for start in range(0, len(audio), n):
                chunk = audio[None, start : start + n]  # (1, n) planar mono
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                af.sample_rate, af.pts = sr, start
                container.mux(aus.encode(af))
            container.mux(aus.encode(None))


def _prepare(video: torch.Tensor | np.ndarray, fps: float, audio: np.ndarray | None,
             sr: int) -> tuple[np.ndarray, Fraction, np.ndarray | None]:
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = to_uint8_frames(video)
    if len(frames) == 0:
        raise ValueError("video has no frames")
    rate = Fraction(fps).limit_denominator(1001)
    if audio is not None:
        if sr <= 0:
            raise ValueError(f"sr must be positive, got {sr}")
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono 1-D float32, got shape {audio.shape}")
        frames, audio = _cut_to_shorter(frames, audio, rate, sr)
        audio = np.clip(audio, -1.0, 1.0)
    return _pad_even(frames), rate, audio


def _temp_beside(dest: Path, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    return tmp


def write_video(
    path: str | os.PathLike,
    video: torch.Tensor | np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sr: int = 16000,
    *,
    crf: int = 18,
) -> Path:
    """Write an H.264 (yuv420p) mp4, with `audio` muxed as AAC when given; both are cut to the shorter stream.

    `video` is (3, T, H, W) float in [-1, 1] or uint8 (T, H, W, 3). Odd H/W are edge-padded to even.
    The file is written to a temporary name in the same folder and renamed at the end (os.replace), so a
    crash never leaves a partial file at `path`; on error the temporary file is removed.
    """
    return write_video_with_sidecar(path, video, fps, audio, sr, crf=crf, sidecar=None)


def write_video_with_sidecar(
    path: str | os.PathLike,
    video: torch.Tensor | np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sr: int = 16000,
    *,
    crf: int = 18,
    sidecar: Callable[[int], dict] | None = None,
) -> Path:
    """`write_video`, plus `<name>.json` from `sidecar(frames_written)`: the two files appear together or not at all.

    Both are written in full to temporary files beside the destination first (a full disk fails there, leaving
    nothing), then renamed: the sidecar first, the mp4 last; if the mp4 rename fails the sidecar is removed again.
    """
    dest = Path(path)
    if dest.suffix.lower() != ".mp4":
        raise ValueError(f"write_video writes mp4 only, got {str(dest)!r}")
    frames, rate, audio = _prepare(video, fps, audio, sr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    json_dest = dest.with_suffix(".json")
    tmps: list[str] = []
    done: list[Path] = []
    try:
        tmp = _temp_beside(dest, ".part.mp4")
        tmps.append(tmp)
        _mux(tmp, frames, rate, audio, sr, crf)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the final file ordinary permissions
        if sidecar is not None:
            jtmp = _temp_beside(dest, ".part.json")
            tmps.append(jtmp)
            with open(jtmp, "w", encoding="utf-8") as f:
                json.dump(sidecar(len(frames)), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(jtmp, 0o644)
            os.replace(jtmp, json_dest)
            done.append(json_dest)
        os.replace(tmp, dest)
    except BaseException:
        # BaseException: also clean up on KeyboardInterrupt / SIGTERM; the error is always re-raised.
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)
        for d in done:
            d.unlink(missing_ok=True)
        raise
    return dest


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """Decode the first video stream to (3, T, H, W) float in [-1, 1]; returns (video, fps)."""
    import av

    p = _require_file(path)
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise ValueError(f"no video stream in {str(p)!r}")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video from {str(p)!r}: {e}") from e
    if not frames:
        raise ValueError(f"video file {str(p)!r} contains no frames")
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()  # (3, T, H, W)
    return x / 127.5 - 1.0, fps


def probe_video(path: str | os.PathLike) -> dict:
    """Decode a file fully and report frames, width, height, fps, video_duration and audio_duration (seconds).

    `frames` is counted by decoding; video_duration = frames / fps. audio_duration comes from the stream's
    duration metadata, because decoding AAC yields whole 1024-sample frames (the last one zero padded) and
    would overstate it; it falls back to the decoded sample count, and is 0.0 when there is no audio stream.
    """
    import av

    p = _require_file(path)
    info = {"frames": 0, "width": 0, "height": 0, "fps": 0.0, "video_duration": 0.0, "audio_duration": 0.0}
    with av.open(str(p)) as container:
        if container.streams.video:
            vs = container.streams.video[0]
            info["width"], info["height"] = vs.codec_context.width, vs.codec_context.height
            info["fps"] = float(vs.average_rate or vs.guessed_rate or 0)
            info["frames"] = sum(1 for _ in container.decode(vs))
            if info["fps"]:
                info["video_duration"] = info["frames"] / info["fps"]
    with av.open(str(p)) as container:
        if container.streams.audio:
            aus = container.streams.audio[0]
            if aus.duration is not None:
                info["audio_duration"] = float(aus.duration * aus.time_base)
            else:
                samples = sum(f.samples for f in container.decode(aus))
                info["audio_duration"] = samples / aus.codec_context.sample_rate
            info["sample_rate"] = aus.codec_context.sample_rate
    return info
