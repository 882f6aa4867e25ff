"""The task registry: the one place where sizes, defaults, expert cuts, layouts and strides live.

A `PipelineConfig` composes the component configs (DiT, VAE, encoders) with the task's sampling defaults, its
expert layout, its checkpoint layout and its output sizes. Official values come from the Wan2.2 configs (spec
section 3). Every command (`generate`, `experts`, `plan`, `eval`, `verify`) and the Python API take their task
list from `PRESETS`; the VAE and patch strides are read from the component configs (`vae.stride`,
`dit.patch_size`), never written as literals elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from wanmoe import experts as ex
from wanmoe.encoders.audio import MelConfig
from wanmoe.encoders.text import ByteTextConfig
from wanmoe.models.dit import DiTConfig
from wanmoe.models.s2v import S2VConfig
from wanmoe.models.vae import VAEConfig

# The embedded models' weights and example inputs (src/wanmoe/assets/<task>).
ASSETS = Path(__file__).resolve().parent / "assets"
# Frames the official S2V code drops from the first clip when it does not start from the reference image.
S2V_FIRST_CLIP_DROP = 3

# Negative prompts: verbatim values of the official configs.
NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
NEG_PROMPT_S2V = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class Distilled:
    """A few-step option that ships with an embedded model: step-distillation LoRAs per expert (file names under
    `ASSETS/loras`) and the request settings they were trained for (`make_request` keywords; a caller's own value
    wins). `wanmoe.load(..., distilled=True)`, `Pipeline.use_distilled()`, `--distilled`."""

    loras: dict[str, str]  # expert -> LoRA file in ASSETS/loras
    settings: dict[str, object]  # make_request keywords: steps, solver, ...


@dataclass(frozen=True)
class PipelineConfig:
    task: str
    modality: str  # "t2v" | "i2v" | "s2v": which conditioning preparation runs (pipeline.CLIPS)
    dit: DiTConfig
    vae: VAEConfig
    # Experts, high noise first. Folder names follow the official layout; a single-expert model has one entry.
    experts: tuple[str, ...] = ("high", "low")
    boundary: float | tuple[float, ...] | None = None  # official timestep-fraction cut(s), one per expert pair
    text_encoder: str = "umt5-xxl"  # "umt5-xxl" | "byte"
    byte_text: ByteTextConfig | None = None  # the small trainable text encoder, when text_encoder == "byte"
    audio_encoder: str | None = None  # "wav2vec2" | "mel" | None
    mel: MelConfig | None = None  # log-mel features, when audio_encoder == "mel"
    sample_steps: int = 40
    sample_shift: float = 5.0
    sample_solver: str = "unipc"
    guide_scale: dict[str, float] = field(default_factory=dict)  # per expert, by name
    sample_fps: int = 16
    frame_num: int = 81
    infer_frames: int = 80  # s2v frames per clip
    default_size: str = "1280*720"
    sizes: tuple[str, ...] = ()
    neg_prompt: str = NEG_PROMPT
    example_prompt: str = ""
    embedded: bool = False  # weights ship inside the package (src/wanmoe/assets/<task>)
    motion_scale: float = 1.0  # s2v audio guidance default (1 = plain conditioning); --motion_scale overrides it
    clip_context: str = "frames"  # s2v: what a clip after the first starts from (request.CLIP_CONTEXTS)
    # Checkpoint layout: a key of layouts.TASK_LAYOUTS (official trees), or "small" (wanmoe's own small models:
    # DiT folders + vae.safetensors + byte_text_encoder.safetensors).
    layout: str = "small"
    distilled: Distilled | None = None  # a shipped few-step option (embedded models only)

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression of the VAE: read from the VAE config, never written elsewhere."""
        return self.vae.stride

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: VAE stride x patch size."""
        return self.vae_stride[1] * self.dit.patch_size[1]

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of a causal VAE clip: the first pixel frame alone, then one latent per stride."""
        return (pixel_frames - 1) // self.vae_stride[0] + 1

    def dropped_frames(self, start_from_ref: bool) -> int:
        """Pixel frames the first S2V clip loses (official), and so how far into the audio the video starts."""
        drops = self.modality == "s2v" and self.dit.s2v is not None and self.dit.s2v.drop_first_motion
        return S2V_FIRST_CLIP_DROP if drops and not start_from_ref else 0

    def expert_spec(self, boundary: float | None = None, threshold: float | None = None,
                    blend: float = 0.0) -> ex.ExpertSpec:
        """The task's experts with the switch given as an official boundary (default) or a log-SNR threshold.

        One value is one cut: it only defines the split of a two-expert model; more experts take their cuts
        (a tuple of boundaries) from the preset. Raises ValueError naming `boundary`/`threshold`/`blend`.
        """
        n = len(self.experts)
        if n == 1:
            if threshold is not None or boundary is not None or blend:
                raise ValueError(f"task {self.task} has a single expert: boundary, threshold and blend do not apply")
            return ex.ExpertSpec(names=self.experts)
        if (threshold is not None or boundary is not None) and n != 2:
            raise ValueError(f"boundary/threshold set the single cut between two experts; {self.task} has "
                             f"{n} experts {self.experts}")
        if threshold is not None:
            return ex.ExpertSpec(names=self.experts, thresholds=(threshold,), blend=blend)
        return ex.ExpertSpec(names=self.experts, boundary=self.boundary if boundary is None else boundary,
                             blend=blend)

    def with_vae(self, vae: VAEConfig) -> PipelineConfig:
        """This small model with another VAE: a retrained one whose latent width may differ (s2v-mini on a 32-channel
        latent). The DiT's input and output channels, and the S2V pose-latent width, follow the latent; the rest of
        the DiT stays the preset's. Only for models whose DiT reads and writes the bare latent (t2v, s2v)."""
        z, old = vae.z_dim, self.vae.z_dim
        if z == old:
            return dataclasses.replace(self, vae=vae)
        if self.layout != "small" or not self.dit.in_dim == self.dit.out_dim == old:
            raise ValueError(f"{self.task}: the latent width is fixed at {old} (its DiT does not read the bare "
                             f"latent, or it is an official model); got a VAE with {z} channels")
        s2v = self.dit.s2v
        if s2v is not None and s2v.cond_dim == old:
            s2v = dataclasses.replace(s2v, cond_dim=z)
        return dataclasses.replace(self, vae=vae, dit=dataclasses.replace(self.dit, in_dim=z, out_dim=z, s2v=s2v))

    def single_expert(self) -> PipelineConfig:
        """This task served by one DiT (the dense baseline of a two-expert model: a single-folder checkpoint)."""
        if len(self.experts) == 1:
            return self
        last = self.experts[-1]
        return dataclasses.replace(self, experts=(last,), boundary=None, guide_scale={last: self.guide_scale[last]})

    def example_files(self) -> dict[str, Path]:
        """The example reference image / audio / prompt that ship with an embedded task."""
        d = ASSETS / self.task / "example"
        return {"image": d / "ref.png", "audio": d / "audio.wav", "prompt": d / "prompt.txt"}


_A14B_SIZES = ("720*1280", "1280*720", "480*832", "832*480")
_S2V_SIZES = (*_A14B_SIZES, "1024*704", "704*1024", "704*1280", "1280*704")


def _presets() -> dict[str, PipelineConfig]:
    from wanmoe.models.dit import DIT_PRESETS
    from wanmoe.models.vae import VAE21, VAE_TINY

    t2v = PipelineConfig(
        task="t2v-A14B", modality="t2v", dit=DIT_PRESETS["t2v-a14b"], vae=VAE21, boundary=0.875,
        sample_steps=40, sample_shift=12.0, guide_scale={"high": 4.0, "low": 3.0}, sizes=_A14B_SIZES, layout="t2v-a14b",
        example_prompt="Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a "
                       "spotlighted stage.",
    )
    i2v = dataclasses.replace(
        t2v, task="i2v-A14B", modality="i2v", dit=DIT_PRESETS["i2v-a14b"], boundary=0.900, sample_shift=5.0,
        guide_scale={"high": 3.5, "low": 3.5}, layout="i2v-a14b",
        example_prompt="Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard.",
    )
    s2v = PipelineConfig(
        task="s2v-14B", modality="s2v", dit=DIT_PRESETS["s2v-14b"], vae=VAE21, experts=("low",), boundary=None,
        audio_encoder="wav2vec2", sample_steps=40, sample_shift=3.0, guide_scale={"low": 4.5}, sizes=_S2V_SIZES,
        default_size="1024*704", infer_frames=80, neg_prompt=NEG_PROMPT_S2V, layout="s2v-14b",
        example_prompt="A person is singing passionately into a microphone on a stage.",
    )
    out = {c.task: c for c in (t2v, i2v, s2v)}
    # Tiny random-weight variants of every official task, for tests (same code path, small sizes).
    for name in ("t2v-A14B", "i2v-A14B", "s2v-14B"):
        c = out[name]
        tiny_name = name.split("-")[0] + "-tiny"
        dit = DIT_PRESETS[f"{name.lower()}-tiny"]
        if dit.s2v is not None:  # the tiny models hear log-mel features: one layer
            dit = dataclasses.replace(dit, s2v=dataclasses.replace(dit.s2v, num_audio_layers=1))
        out[tiny_name] = dataclasses.replace(
            c, task=tiny_name, dit=dit, vae=VAE_TINY, text_encoder="byte",
            byte_text=ByteTextConfig(text_dim=dit.text_dim, text_len=dit.text_len, num_layers=1, num_heads=2),
            audio_encoder="mel" if c.modality == "s2v" else None,
            mel=MelConfig(n_mels=dit.s2v.audio_dim) if dit.s2v else None, sample_steps=2, sizes=(),
            default_size="64*64", frame_num=5, infer_frames=8, neg_prompt="", layout="small",
        )
    out[MINI.task] = MINI
    return out


# The embedded model: a small two-expert S2V model trained here on the procedural talking-avatar dataset
# (wanmoe.data.avatar); its weights ship in src/wanmoe/assets/s2v-mini. Sizes chosen so a CPU training step stays
# well under a second and `python generate.py` makes 4 s of 128x128 video in well under 90 s on 2 cores.
MINI = PipelineConfig(
    task="s2v-mini", modality="s2v",
    dit=DiTConfig(
        "s2v", 32, 32, dim=96, ffn_dim=256, freq_dim=64, text_dim=64, text_len=96, num_heads=3, num_layers=4,
        s2v=S2VConfig(cond_dim=32, audio_dim=32, num_audio_layers=1, num_audio_token=4,
                      audio_inject_layers=(0, 1, 2, 3), motion_frames=25, zip_frame_buckets=(1, 2, 4)),
    ),
    # A 32-channel latent since round 8 (docs/vae_v2.md); folders of the 16-channel rounds still load
    # (`layouts.fit_small` takes the width from the folder's VAE file).
    vae=VAEConfig(dim=16, num_res_blocks=1, z_dim=32, mean=(0.0,) * 32, std=(1.0,) * 32),  # trained stats replace these
    experts=("high", "low"), boundary=0.900, text_encoder="byte",
    byte_text=ByteTextConfig(text_dim=64, text_len=96, num_layers=2, num_heads=4),
    audio_encoder="mel", mel=MelConfig(n_mels=32),
    sample_steps=20, sample_shift=5.0, guide_scale={"high": 1.0, "low": 1.0}, sample_fps=16, infer_frames=68,
    default_size="128*128", sizes=("128*128",), neg_prompt="", embedded=True,
    motion_scale=2.0,  # audio guidance: real-speech sync 0.46 -> 0.52 for 0.5 dB PSNR (docs/results.md)
    # Every clip from the reference and the same noise: over 30 s of speech the last 4 s score 18.4 dB (first 4 s:
    # 18.7) instead of 14.1, colour drift 2.5 levels instead of 33; the official chaining ("frames") drifts on this
    # model (round 8, docs/results.md).
    clip_context="reference",
    example_prompt="a square yellow face with blue eyes on a sky blue background, nodding gently while talking",
    # 2 Euler steps (one per expert) whose LoRAs were trained to land on the 20-step sampler's states (wanmoe train
    # distill; docs/results.md): 20x fewer transformer passes, the audio guidance folded into the LoRAs.
    distilled=Distilled(loras={e: f"s2v-mini_distill2_{e}.safetensors" for e in ("high", "low")},
                        settings={"steps": 2, "solver": "euler", "motion_scale": 1.0}),
)


PRESETS: dict[str, PipelineConfig] = _presets()
DEFAULT_TASK = "s2v-mini"


def get_preset(task: str) -> PipelineConfig:
    """A task by name (case-insensitive: `t2v-a14b` is `t2v-A14B`); ValueError listing the tasks otherwise."""
    for name, cfg in PRESETS.items():
        if name.lower() == str(task).lower():
            return cfg
    raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(PRESETS))}")
