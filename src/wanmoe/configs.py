"""Task presets: the one place where sizes and sampling defaults live (STYLE.md 1).

A `PipelineConfig` composes the component configs (DiT, VAE, encoders) with the task's sampling
defaults and its expert layout. Official values come from the Wan2.2 configs (spec section 3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from wanmoe.encoders.audio import MelConfig
from wanmoe.encoders.text import ByteTextConfig
from wanmoe.models.dit import DiTConfig
from wanmoe.models.s2v import S2VConfig
from wanmoe.models.vae import VAEConfig

# Negative prompts (spec section 3), verbatim values of the official configs.
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
class PipelineConfig:
    task: str
    modality: str  # "t2v" | "i2v" | "ti2v" | "s2v": which conditioning preparation runs
    dit: DiTConfig
    vae: VAEConfig
    # Experts, high noise first. Folder names follow the official layout; a single-expert model has one entry.
    experts: tuple[str, ...] = ("high", "low")
    boundary: float | tuple[float, ...] | None = None  # official timestep-fraction cut(s), one per expert pair
    text_encoder: str = "umt5-xxl"  # "umt5-xxl" | "byte"
    byte_text: ByteTextConfig | None = None  # the small trainable text encoder, when text_encoder == "byte"
    audio_encoder: str | None = None  # "wav2vec2" | "mel" | None
    mel: MelConfig | None = None  # log-mel features, when audio_encoder == "mel"
    vae_stride: tuple[int, int, int] = (4, 8, 8)
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

    @property
    def size_multiple(self) -> int:
        return self.vae_stride[1] * self.dit.patch_size[1]


_A14B_SIZES = ("720*1280", "1280*720", "480*832", "832*480")
_S2V_SIZES = (*_A14B_SIZES, "1024*704", "704*1024", "704*1280", "1280*704")


def _presets() -> dict[str, PipelineConfig]:
    from wanmoe.models.dit import DIT_PRESETS
    from wanmoe.models.vae import VAE21, VAE_TINY

    t2v = PipelineConfig(
        task="t2v-A14B", modality="t2v", dit=DIT_PRESETS["t2v-a14b"], vae=VAE21, boundary=0.875,
        sample_steps=40, sample_shift=12.0, guide_scale={"high": 4.0, "low": 3.0}, sizes=_A14B_SIZES,
        example_prompt="Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a "
                       "spotlighted stage.",
    )
    i2v = dataclasses.replace(
        t2v, task="i2v-A14B", modality="i2v", dit=DIT_PRESETS["i2v-a14b"], boundary=0.900, sample_shift=5.0,
        guide_scale={"high": 3.5, "low": 3.5},
        example_prompt="Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard.",
    )
    s2v = PipelineConfig(
        task="s2v-14B", modality="s2v", dit=DIT_PRESETS["s2v-14b"], vae=VAE21, experts=("low",), boundary=None,
        audio_encoder="wav2vec2", sample_steps=40, sample_shift=3.0, guide_scale={"low": 4.5}, sizes=_S2V_SIZES,
        default_size="1024*704", infer_frames=80, neg_prompt=NEG_PROMPT_S2V,
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
            default_size="64*64", frame_num=5, infer_frames=8, neg_prompt="",
        )
    out[MINI.task] = MINI
    return out


# The embedded model: a small two-expert S2V model trained here on the procedural talking-avatar dataset
# (wanmoe.data.avatar); its weights ship in src/wanmoe/assets/s2v-mini. Sizes chosen so a CPU training step stays
# well under a second and `python generate.py` makes 4 s of 128x128 video in well under 90 s on 2 cores.
MINI = PipelineConfig(
    task="s2v-mini", modality="s2v",
    dit=DiTConfig(
        "s2v", 16, 16, dim=96, ffn_dim=256, freq_dim=64, text_dim=64, text_len=96, num_heads=3, num_layers=4,
        s2v=S2VConfig(cond_dim=16, audio_dim=32, num_audio_layers=1, num_audio_token=4,
                      audio_inject_layers=(0, 1, 2, 3), motion_frames=25, zip_frame_buckets=(1, 2, 4)),
    ),
    vae=VAEConfig(dim=16, num_res_blocks=1, mean=(0.0,) * 16, std=(1.0,) * 16),  # stats replaced by the trained ones
    experts=("high", "low"), boundary=0.900, text_encoder="byte",
    byte_text=ByteTextConfig(text_dim=64, text_len=96, num_layers=2, num_heads=4),
    audio_encoder="mel", mel=MelConfig(n_mels=32),
    sample_steps=20, sample_shift=5.0, guide_scale={"high": 1.0, "low": 1.0}, sample_fps=16, infer_frames=68,
    default_size="128*128", sizes=("128*128",), neg_prompt="", embedded=True,
    motion_scale=2.0,  # audio guidance: real-speech sync 0.46 -> 0.52 for 0.5 dB PSNR (docs/results.md)
    example_prompt="a square yellow face with blue eyes on a sky blue background, nodding gently while talking",
)


PRESETS: dict[str, PipelineConfig] = _presets()
DEFAULT_TASK = "s2v-mini"


def get_preset(task: str) -> PipelineConfig:
    if task not in PRESETS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[task]
