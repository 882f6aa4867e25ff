"""Audio encoders: speech features aligned to video frames for S2V.

Axis legend: A audio frames at the encoder's native rate (wav2vec2: 50 Hz), T video frames,
Ly feature layers (wav2vec2: hidden states incl. the input embedding; mel: 1), Dm feature dim.

Every encoder maps `(audio float32 mono, sr, fps) -> (Ly, Dm, T)`, one feature vector per video frame,
which is the per-clip layout `S2VInputs.audio` expects (after `audio_clips` splits it into clips).

- `Wav2Vec2AudioEncoder`: the official S2V features (HF wav2vec2 from local files, all hidden states,
  50 Hz -> 30 fps linear resampling, nearest-frame bucketing to the video fps).
- `MelAudioEncoder`: a dependency-free log-mel spectrogram at the video fps for the tiny S2V model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AudioEncoder",
    "MelConfig",
    "MelAudioEncoder",
    "Wav2Vec2AudioEncoder",
    "resample_linear",
    "bucket_to_video_frames",
    "official_num_clips",
    "audio_clips",
    "mel_filterbank",
]


class AudioEncoder(Protocol):
    def __call__(self, audio: np.ndarray, sr: int, fps: float) -> torch.Tensor:
        """float32 mono samples at `sr` -> (Ly, Dm, T) features, one column per video frame at `fps`."""
        ...


def _check_audio(audio: np.ndarray, sr: int, fps: float) -> torch.Tensor:
    a = np.asarray(audio)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"audio must be a non-empty 1-D mono array, got shape {a.shape}")
    if sr <= 0 or fps <= 0:
        raise ValueError(f"sr and fps must be positive, got sr={sr}, fps={fps}")
    return torch.from_numpy(a.astype(np.float32, copy=False))


# ------------------------------------------------------------------------------------ frame alignment
def resample_linear(feats: torch.Tensor, src_rate: float, dst_rate: float) -> torch.Tensor:
    """(Ly, A, Dm) at src_rate -> (Ly, int(A / src_rate * dst_rate), Dm), linear, align_corners=True.

    The official S2V audio encoder's `linear_interpolation` (50 Hz wav2vec2 -> 30 fps).
    """
    n_out = int(feats.shape[1] / float(src_rate) * dst_rate)
    if n_out < 1:
        raise ValueError(f"audio too short: {feats.shape[1]} frames at {src_rate} Hz give no frame at {dst_rate} Hz")
    x = feats.transpose(1, 2)  # (Ly, Dm, A)
    x = F.interpolate(x, size=n_out, mode="linear", align_corners=True)  # (Ly, Dm, A')
    return x.transpose(1, 2)  # (Ly, A', Dm)


def _frame_index(n_frames: int, src_rate: float, fps: float) -> torch.Tensor:
    # Video frame k reads source index round(k / fps * src_rate); numpy/torch round half to even, as the
    # official get_sample_indices (np.round) does, e.g. frame 12 at 16 fps -> 22.5 -> 22.
    t = torch.arange(n_frames, dtype=torch.float64) / fps
    return torch.round(t * src_rate).long()


def official_num_clips(n_src: int, src_rate: float, fps: float, infer_frames: int) -> int:
    """Wan2.2 get_audio_embed_bucket_fps: int(N / (infer_frames * src_rate / fps)) + 1 clips."""
    return int(n_src / (infer_frames * (src_rate / fps))) + 1


def bucket_to_video_frames(
    feats: torch.Tensor, src_rate: float, fps: float, n_frames: int | None = None
) -> torch.Tensor:
    """(Ly, N, Dm) features at src_rate -> (Ly, Dm, T): frame k takes index round(k*src_rate/fps); zero past the end.

    The official S2V audio encoder's `get_audio_embed_bucket_fps` with m=0 (a single source frame per video frame).
    With n_frames=None, T is the number of video frames whose source index lies inside the audio.
    """
    ly, n_src, dm = feats.shape
    if n_frames is None:
        # frames whose index is < n_src; indices are monotone, so count over a safe upper bound
        bound = int(math.ceil((n_src + 1) * fps / src_rate)) + 1
        n_frames = int((_frame_index(bound, src_rate, fps) < n_src).sum())
    idx = _frame_index(n_frames, src_rate, fps)  # (T,)
    valid = idx < n_src
    out = feats.new_zeros(ly, n_frames, dm)  # (Ly, T, Dm)
    out[:, valid] = feats[:, idx[valid]]
    return out.permute(0, 2, 1).contiguous()  # (Ly, Dm, T)


def audio_clips(features: torch.Tensor, infer_frames: int, num_clip: int | None = None) -> torch.Tensor:
    """(Ly, Dm, T) -> (num_clips, Ly, Dm, infer_frames), zero padded at the end.

    num_clips = ceil(T / infer_frames), capped by `num_clip` when given (like --num_clip). Note the official
    count int(N30 / (infer_frames*30/fps)) + 1 (see `official_num_clips`) is the same except when the audio
    ends exactly on a clip boundary, where it appends one clip of pure zeros; pass num_clip to reproduce it.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (Ly, Dm, T), got {tuple(features.shape)}")
    if infer_frames <= 0:
        raise ValueError(f"infer_frames must be positive, got {infer_frames}")
    t = features.shape[-1]
    n = max(1, math.ceil(t / infer_frames))
    if num_clip is not None:
        if num_clip <= 0:
            raise ValueError(f"num_clip must be positive, got {num_clip}")
        n = num_clip
    x = F.pad(features, (0, max(0, n * infer_frames - t)))[..., : n * infer_frames]  # (Ly, Dm, n*Tc)
    return x.unflatten(-1, (n, infer_frames)).permute(2, 0, 1, 3).contiguous()  # (n, Ly, Dm, Tc)


# ----------------------------------------------------------------------------------------------- mel
@dataclass(frozen=True)
class MelConfig:
    n_mels: int = 32
    f_min: float = 50.0
    f_max: float | None = None  # None = sr / 2
    window_frames: float = 2.0  # analysis window length in video frames (50% overlap between frames)
    log_floor: float = 1e-5  # power floor before log10; silence maps to -1 after the affine below
    log_offset: float = 2.5
    log_scale: float = 2.5

    def validate(self) -> None:
        if self.n_mels <= 0:
            raise ValueError(f"n_mels must be positive, got {self.n_mels}")
        if self.window_frames < 1.0:
            raise ValueError(f"window_frames must be >= 1, got {self.window_frames}")
        if self.f_max is not None and self.f_max <= self.f_min:
            raise ValueError(f"f_max ({self.f_max}) must be above f_min ({self.f_min})")


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)  # HTK mel scale


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, sr: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_mels, n_fft//2+1) triangular HTK-mel filters with unit peak (Davis & Mermelstein 1980)."""
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)  # (K,)
    mels = torch.linspace(_hz_to_mel(torch.tensor(f_min)), _hz_to_mel(torch.tensor(f_max)), n_mels + 2)
    edges = _mel_to_hz(mels.double())  # (n_mels + 2,)
    lo, ce, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    up = (freqs - lo) / (ce - lo)
    down = (hi - freqs) / (hi - ce)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()  # (n_mels, K)


class MelAudioEncoder:
    """Log-mel spectrogram with one STFT frame per video frame: (audio, sr, fps) -> (1, n_mels, T).

    hop = sr / fps samples, so column k summarises the audio of video frame k (window centred on the middle
    of the frame). T = ceil(len(audio) * fps / sr): every frame that has audio. Non-integer sr/fps rounds
    the hop and linearly resamples the columns to T.
    """

    def __init__(self, cfg: MelConfig | None = None):
        self.cfg = cfg or MelConfig()
        self.cfg.validate()

    @property
    def num_layers(self) -> int:
        return 1

    @property
    def dim(self) -> int:
        return self.cfg.n_mels

    def __call__(self, audio: np.ndarray, sr: int, fps: float) -> torch.Tensor:
        cfg = self.cfg
        x = _check_audio(audio, sr, fps)  # (N,)
        hop = max(1, round(sr / fps))
        n_fft = max(16, int(round(cfg.window_frames * hop)))
        t_out = math.ceil(len(x) * fps / sr)
        # Centre window k on sample (k + 0.5) * hop; zero padding at both ends (silence outside the clip).
        left = n_fft // 2 - hop // 2
        right = max(0, t_out * hop + n_fft - left - len(x))
        xp = F.pad(x, (left, right))
        spec = torch.stft(
            xp, n_fft=n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=False, return_complex=True
        )  # (K, T')
        power = spec.abs().pow(2)[:, :t_out] / n_fft  # (K, T); /n_fft keeps levels comparable across fps
        fb = mel_filterbank(n_fft, sr, cfg.n_mels, cfg.f_min, cfg.f_max or sr / 2.0)  # (n_mels, K)
        mel = fb @ power  # (n_mels, T)
        logmel = (torch.log10(mel.clamp_min(cfg.log_floor)) + cfg.log_offset) / cfg.log_scale
        if abs(sr / fps - hop) > 1e-6:  # hop was rounded: stretch the columns back onto the exact frame grid
            logmel = F.interpolate(logmel[None], size=t_out, mode="linear", align_corners=True)[0]
        return logmel[None]  # (1, n_mels, T)


# ------------------------------------------------------------------------------------------- wav2vec2
class Wav2Vec2AudioEncoder:
    """wav2vec2 hidden states (HF, local files only) bucketed to video frames: -> (Ly=L+1, 1024, T).

    As the official S2V audio encoder: processor -> model(output_hidden_states=True) -> all hidden states
    stacked -> 50 Hz to 30 fps linear -> per-video-frame nearest bucketing. Runs in fp32 on `device`.
    """

    native_rate = 50.0  # wav2vec2 frame rate: 16 kHz / conv stride 320
    bucket_rate = 30.0  # the official intermediate "video_rate"
    sample_rate = 16000

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import AutoFeatureExtractor, Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Model

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"no wav2vec2 config.json in {str(folder)!r}")
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
        arch = (Wav2Vec2Config.from_pretrained(folder, local_files_only=True).architectures or [""])[0]
        # The official checkpoint is a CTC model; its encoder hidden states are the same as Wav2Vec2Model's.
        cls = Wav2Vec2ForCTC if arch == "Wav2Vec2ForCTC" else Wav2Vec2Model
        self.model = cls.from_pretrained(folder, local_files_only=True).to(device).eval().float()
        self.device = torch.device(device)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers + 1

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def hidden_states(self, audio: np.ndarray, sr: int) -> torch.Tensor:
        """16 kHz mono -> (Ly, A, Dm) all hidden states at 50 Hz (float32, CPU)."""
        _check_audio(audio, sr, 1.0)
        if sr != self.sample_rate:
            raise ValueError(f"wav2vec2 needs {self.sample_rate} Hz audio, got {sr} (use media.read_audio(sr=16000))")
        inputs = self.feature_extractor(np.asarray(audio, np.float32), sampling_rate=sr, return_tensors="pt")
        out = self.model(inputs.input_values.to(self.device), output_hidden_states=True)
        return torch.cat(out.hidden_states).float().cpu()  # (Ly, A, Dm); each state is (1, A, Dm)

    def __call__(self, audio: np.ndarray, sr: int, fps: float) -> torch.Tensor:
        feats30 = resample_linear(self.hidden_states(audio, sr), self.native_rate, self.bucket_rate)  # (Ly, N30, Dm)
        return bucket_to_video_frames(feats30, self.bucket_rate, fps)  # (Ly, Dm, T)

    def encode_clips(self, audio: np.ndarray, sr: int, fps: float, infer_frames: int) -> tuple[torch.Tensor, int]:
        """Exactly the official layout: (Ly, Dm, num_clips * infer_frames) and num_clips (with its +1 rule)."""
        feats30 = resample_linear(self.hidden_states(audio, sr), self.native_rate, self.bucket_rate)
        n = official_num_clips(feats30.shape[1], self.bucket_rate, fps, infer_frames)
        return bucket_to_video_frames(feats30, self.bucket_rate, fps, n * infer_frames), n
