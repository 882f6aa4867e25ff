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


def _temp_beside(dest: Path, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    return tmp


class VideoWriter:
    """Streams frames into an H.264 (yuv420p) mp4 as they arrive, muxes the audio (known up front) as AAC at the
    end, and makes the file and its JSON sidecar appear together at `close`, or neither.

    Both streams are cut to the shorter, like ffmpeg -shortest: frames past the audio's end are dropped as they
    come, and the audio is trimmed to the frames written. Memory holds one batch of frames at a time, so a long
    video costs no more than a short one. Everything is written to temporary files beside `path` first; `abort`
    (or leaving a `with` block by an exception, Ctrl-C included) removes them.
    """

    def __init__(self, path: str | os.PathLike, fps: float, audio: np.ndarray | None = None, sr: int = 16000, *,
                 crf: int = 18) -> None:
        import av

        self.dest = Path(path)
        if self.dest.suffix.lower() != ".mp4":
            raise ValueError(f"write_video writes mp4 only, got {str(self.dest)!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.rate = Fraction(fps).limit_denominator(1001)
        self.audio, self.sr, self.crf = None, sr, crf
        self.max_frames: int | None = None
        if audio is not None:
            if sr <= 0:
                raise ValueError(f"sr must be positive, got {sr}")
            a = np.asarray(audio, dtype=np.float32)
            if a.ndim != 1:
                raise ValueError(f"audio must be mono 1-D float32, got shape {a.shape}")
            self.max_frames = int(Fraction(len(a)) * self.rate / sr)
            if self.max_frames == 0:
                raise ValueError(f"audio ({len(a)} samples at {sr} Hz) is shorter than one video frame at "
                                 f"{float(self.rate)} fps")
            self.audio = np.clip(a, -1.0, 1.0)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temp_beside(self.dest, ".part.mp4")
        self.container = av.open(self.tmp, mode="w", format="mp4")
        self.vs = self.aus = None
        self.frames = 0

    def _open_streams(self, h: int, w: int) -> None:
        self.vs = self.container.add_stream("libx264", rate=self.rate)
        self.vs.width, self.vs.height, self.vs.pix_fmt = w, h, "yuv420p"
        self.vs.options = {"crf": str(self.crf), "preset": "medium"}
        if self.audio is not None:
            self.aus = self.container.add_stream("aac", rate=self.sr, layout="mono")

    def add(self, video: torch.Tensor | np.ndarray) -> None:
        """Append frames: (3, T, H, W) float in [-1, 1] or uint8 (T, H, W, 3); odd H/W are edge-padded."""
        import av

        frames = _pad_even(to_uint8_frames(video))
        if self.max_frames is not None:
            frames = frames[: max(0, self.max_frames - self.frames)]
        if len(frames) == 0:
            return
        if self.vs is None:
            self._open_streams(*frames.shape[1:3])
        elif frames.shape[1:3] != (self.vs.height, self.vs.width):
            raise ValueError(f"frames of {frames.shape[2]}x{frames.shape[1]} after {self.vs.width}x{self.vs.height}")
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = self.frames
            self.container.mux(self.vs.encode(frame))
            self.frames += 1

    def _finish_mux(self) -> None:
        import av

        if self.vs is None:
            raise ValueError("video has no frames")
        self.container.mux(self.vs.encode(None))
        if self.aus is not None:
            n_samples = min(len(self.audio), round(Fraction(self.frames) * self.sr / self.rate))
            audio = self.audio[:n_samples]
            # The AAC encoder takes exactly frame_size samples per frame (a shorter last one is allowed).
            n = self.aus.codec_context.frame_size or 1024
            for start in range(0, len(audio), n):
                chunk = audio[None, start : start + n]  # (1, n) planar mono
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                af.sample_rate, af.pts = self.sr, start
                self.container.mux(self.aus.encode(af))
            self.container.mux(self.aus.encode(None))
        self.container.close()

    def close(self, sidecar: Callable[[int], dict] | None = None) -> Path:
        """Finish the file; with `sidecar(frames_written)`, write `<name>.json` too. Both appear, or neither."""
        json_dest = self.dest.with_suffix(".json")
        tmps, done = [self.tmp], []
        try:
            self._finish_mux()
            os.chmod(self.tmp, 0o644)  # mkstemp creates 0600; give the final file ordinary permissions
            if sidecar is not None:
                jtmp = _temp_beside(self.dest, ".part.json")
                tmps.append(jtmp)
                with open(jtmp, "w", encoding="utf-8") as f:
                    json.dump(sidecar(self.frames), f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(jtmp, 0o644)
                os.replace(jtmp, json_dest)
                done.append(json_dest)
            os.replace(self.tmp, self.dest)
        except BaseException:
            # BaseException: also clean up on KeyboardInterrupt / SIGTERM; the error is always re-raised.
            self._remove(tmps)
            for d in done:
                d.unlink(missing_ok=True)
            raise
        return self.dest

    def abort(self) -> None:
        self._remove([self.tmp])

    def _remove(self, paths: list[str]) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 (a half-written container may refuse to close; the file goes anyway)
            pass
        for t in paths:
            if os.path.exists(t):
                os.remove(t)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is not None:
            self.abort()


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
    """`write_video`, plus `<name>.json` from `sidecar(frames_written)`: the two files appear together or not at all."""
    if len(to_uint8_frames(video)) == 0:
        raise ValueError("video has no frames")
    with VideoWriter(path, fps, audio, sr, crf=crf) as w:
        w.add(video)
        return w.close(sidecar)


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
