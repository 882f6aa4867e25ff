"""Smoke-trains every stage of the embedded model's recipe at toy sizes, then generates with the result."""

from __future__ import annotations

import json

import pytest
import torch

from wanmoe.train import cli as train_cli


def test_train_smoke_every_stage(tmp_path):
    out = tmp_path / "run"
    for argv in (["clips", "--n", "3"], ["vae"], ["latents", "--n", "3"], ["expert", "--expert", "high"],
                 ["expert", "--expert", "low"], ["expert", "--expert", "dense"], ["export"]):
        assert train_cli.main([*argv, "--out", str(out), "--smoke", "--quiet"]) == 0
    # Every stage left its artefact, the losses were logged and are finite.
    for name in ("high", "low", "dense"):
        ck = torch.load(out / "experts" / f"{name}.pt", weights_only=True)
        assert ck["step"] == 3
        log = (out / "experts" / f"{name}_loss.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in log]
        assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    exported = out / "export"
    assert (exported / "high_noise_model" / "config.json").is_file()
    assert (exported / "low_noise_model" / "config.json").is_file()
    assert (exported / "single_expert" / "config.json").is_file()
    # The experts own their noise ranges: high above the boundary, low below, dense everywhere.
    rng = {n: json.loads(torch.load(out / "experts" / f"{n}.pt", weights_only=True)["config"])["range"]
           for n in ("high", "low", "dense")}
    assert rng["high"][0] == rng["low"][1] == 0.9 and rng["high"][1] == 1.0 and rng["low"][0] == 0.0
    assert rng["dense"] == [0.0, 1.0]
    # The latents carry the mouth cells; a continued run starts from the EMA weights of an earlier one and
    # trains with the lip-region loss.
    from wanmoe.train.loop import LatentSet

    lat = LatentSet.load(out / "latents.pt")
    assert lat.mouth is not None and lat.mouth.shape == (3, 1, 1, *lat.latents.shape[-2:])
    assert 0 < lat.mouth.sum() < lat.mouth.numel()
    before = (out / "vae" / "vae.safetensors").read_bytes()
    assert train_cli.main(["vae", "--out", str(out), "--quiet", "--phases", "5:5:16:1:1e-3:mouth"]) == 0
    assert torch.load(out / "vae" / "vae_ckpt.pt", weights_only=True)["step"] == 5
    assert (out / "vae" / "vae.safetensors").read_bytes() != before
    cont = tmp_path / "cont"
    (cont / "experts").mkdir(parents=True)
    (cont / "latents.pt").symlink_to(out / "latents.pt")
    init = out / "experts" / "high.pt"
    assert train_cli.main(["expert", "--expert", "high", "--out", str(cont), "--smoke", "--quiet", "--init",
                           str(init), "--mouth_weight", "2"]) == 0
    ck = torch.load(cont / "experts" / "high.pt", weights_only=True)
    assert ck["step"] == 3
    start = torch.load(init, weights_only=True)["ema"]
    # Started from init (not from scratch) and moved from it.
    moved = [k for k in start if not torch.equal(start[k], ck["model"][k])]
    assert moved and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_expert_sigma_sampling_stays_in_range():
    from wanmoe.train.loop import sample_sigmas

    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(10000, 0.9, 1.0, 5.0, g)
    assert s.min() >= 0.9 - 1e-6 and s.max() <= 1.0 + 1e-6
    s = sample_sigmas(10000, 0.0, 0.9, 5.0, g)
    assert s.min() >= 0.0 and s.max() <= 0.9 + 1e-6
    # Distributed like the sampler's shifted steps: with shift 5 most mass sits at high sigma.
    assert (sample_sigmas(10000, 0.0, 1.0, 5.0, g) > 0.5).float().mean() > 0.7


def test_mouth_crops_and_lip_region_loss():
    from wanmoe.train.clips import build_clips
    from wanmoe.train.loop import mouth_cells, velocity_loss
    from wanmoe.train.vae_train import mouth_boxes, random_crops

    clips = build_clips([0, 1], frames=5, size=64, progress=False)
    boxes = mouth_boxes(clips)
    g = torch.Generator().manual_seed(0)
    x, mask = random_crops(clips, g, 4, 5, 32, boxes=boxes, mouth_p=1.0)
    assert x.shape == (4, 3, 5, 32, 32) and mask.shape == (4, 1, 1, 32, 32)
    assert (mask.flatten(1).sum(1) > 0).all()  # every mouth-centred crop holds (part of) the mouth box
    # The mouth interior colour is there: dark-red pixels inside the mask.
    red = (x[:, 0] > -0.6) & (x[:, 1] < -0.7)
    assert (red & (mask[:, 0] > 0)).any()
    _, far = random_crops(clips, g, 8, 5, 16, boxes=boxes, mouth_p=0.0)
    assert far.shape == (8, 1, 1, 16, 16)

    m = mouth_cells((18, 30, 10, 25), (8, 8), 8)
    assert m[0, 0].nonzero().tolist() == [[r, c] for r in (2, 3) for c in (1, 2, 3)]
    pred, target = torch.zeros(1, 2, 3, 8, 8), torch.zeros(1, 2, 3, 8, 8)
    pred[..., 0, 0] = 1.0  # error outside the mouth only
    assert torch.isclose(velocity_loss(pred, target, m[None], 5.0), velocity_loss(pred, target, None, 0.0))
    pred2 = torch.zeros_like(pred)
    pred2[..., 2, 1] = 1.0  # the same error on a mouth cell costs more
    assert velocity_loss(pred2, target, m[None], 5.0) > velocity_loss(pred, target, m[None], 5.0)


def test_espeak_clips_are_real_speech_and_deterministic():
    import numpy as np

    from wanmoe.data.espeak import espeak_sentence, espeak_speech
    from wanmoe.train.clips import build_clips

    assert espeak_sentence(7) == espeak_sentence(7) != espeak_sentence(8)
    a = espeak_speech(7, 1.5)
    assert a.shape == (24000,) and a.dtype == np.float32 and np.abs(a).max() > 0.05
    np.testing.assert_array_equal(a, espeak_speech(7, 1.5))
    clips = build_clips([3], frames=9, size=64, progress=False, speech="espeak")
    assert clips.video.shape == (1, 3, 9, 64, 64) and clips.audio.shape == (1, 9000)
    # The mouth in the render follows this audio, not the procedural one of the same seed.
    synthetic = build_clips([3], frames=9, size=64, progress=False)
    assert not torch.equal(clips.audio, synthetic.audio) and not torch.equal(clips.video, synthetic.video)


def test_latent_sets_concatenate():
    from wanmoe.train.loop import LatentSet

    def one(n, mouth=True):
        return LatentSet(torch.randn(n, 4, 3, 2, 2), torch.randn(n, 1, 5, 8), torch.randn(n, 6, 7), torch.zeros(6, 7),
                         torch.ones(n, 1, 1, 2, 2) if mouth else None)

    both = LatentSet.cat([one(2), one(3)])
    assert both.latents.shape[0] == both.audio.shape[0] == both.context.shape[0] == both.mouth.shape[0] == 5
    assert LatentSet.cat([one(2), one(1, mouth=False)]).mouth is None


def test_vae_sizes_widened_warm_start_and_time_limit(tmp_path):
    """--vae_dim/--vae_mult/--z_dim size the VAE; --vae_init starts a wider latent from a trained VAE computing
    the same reconstruction; --max_minutes stops with a checkpoint that a rerun resumes; --heldout logs PSNR."""
    import dataclasses

    from wanmoe.models.vae import WanVAE
    from wanmoe.train.vae_train import load_init

    out = tmp_path / "run"
    assert train_cli.main(["clips", "--n", "2", "--out", str(out), "--smoke", "--quiet"]) == 0
    small = ["--vae_dim", "4", "--vae_res_blocks", "1", "--vae_mult", "1,2,2,2"]
    assert train_cli.main(["vae", "--out", str(out), "--smoke", "--quiet", *small, "--z_dim", "16"]) == 0
    cfg = json.loads((out / "vae" / "config.json").read_text())
    assert (cfg["dim"], cfg["num_res_blocks"], cfg["dim_mult"], cfg["z_dim"]) == (4, 1, [1, 2, 2, 2], 16)

    wide = tmp_path / "wide"
    (wide / "clips.pt").parent.mkdir(parents=True)
    (wide / "clips.pt").symlink_to(out / "clips.pt")
    argv = ["vae", "--out", str(wide), "--quiet", *small, "--z_dim", "24", "--vae_init",
            str(out / "vae" / "vae.safetensors"), "--phases", "4:5:16:1:1e-3", "--heldout", "1"]
    assert train_cli.main([*argv, "--max_minutes", "0"]) == 0  # stops at once: a checkpoint at step 0
    ck = torch.load(wide / "vae" / "vae_ckpt.pt", weights_only=True)
    assert ck["step"] == 0 and not (wide / "vae" / "vae.safetensors").exists()
    # The widened model at step 0 is the small one plus unused latent channels: the same reconstruction.
    from wanmoe.loading import load_small_vae

    old = load_small_vae(out / "vae" / "vae.safetensors", torch.device("cpu"))
    new = WanVAE(dataclasses.replace(old.cfg, z_dim=24, mean=(0.0,) * 24, std=(1.0,) * 24))
    new.load_state_dict(ck["model"])
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(new.decode(new.encode_moments(x)[0]), old.decode(old.encode(x)))
    load_init(new, out / "vae" / "vae.safetensors")  # the same embedding, straight from the file
    assert all(torch.equal(v, ck["model"][k]) for k, v in new.state_dict().items())

    assert train_cli.main(argv) == 0  # resumes and finishes
    assert torch.load(wide / "vae" / "vae_ckpt.pt", weights_only=True)["step"] == 4
    assert json.loads((wide / "vae" / "config.json").read_text())["z_dim"] == 24
    rows = [json.loads(r) for r in (wide / "vae" / "vae_heldout.jsonl").read_text().splitlines()]
    assert rows and all(k in rows[0] for k in ("all", "late", "mouth")) and rows[0]["step"] == 0

    # --decoder_only: the encoder side keeps the init's weights and latent statistics, the decoder side moves.
    dec = tmp_path / "dec"
    (dec / "clips.pt").parent.mkdir(parents=True)
    (dec / "clips.pt").symlink_to(out / "clips.pt")
    assert train_cli.main(["vae", "--out", str(dec), "--quiet", *small, "--z_dim", "16", "--decoder_only",
                           "--vae_init", str(out / "vae" / "vae.safetensors"), "--phases", "3:5:16:1:1e-3"]) == 0
    tuned = load_small_vae(dec / "vae" / "vae.safetensors", torch.device("cpu"))
    assert (tuned.cfg.mean, tuned.cfg.std) == (old.cfg.mean, old.cfg.std)
    before, after = old.state_dict(), tuned.state_dict()
    enc = [k for k in before if k.startswith(("encoder.", "conv1."))]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    with pytest.raises(ValueError, match="decoder_only"):  # a wider latent has no trained encoder to keep
        train_cli.main(["vae", "--out", str(tmp_path / "dec24"), "--quiet", *small, "--z_dim", "24",
                        "--decoder_only", "--vae_init", str(out / "vae" / "vae.safetensors"),
                        "--phases", "3:5:16:1:1e-3", "--clips", str(out / "clips.pt")])


def test_continuation_clips_train_the_motion_tokens(tmp_path):
    """Clips after the first: the latents hold the motion frames' own encoding, and training on them (and only
    then) moves the modules that read motion latents; a shipped expert folder can start the run."""
    from wanmoe.loading import load_small_vae
    from wanmoe.train.clips import load_clips
    from wanmoe.train.loop import LatentSet

    out = tmp_path / "run"
    for argv in (["clips", "--n", "2"], ["vae"], ["latents", "--n", "2"], ["clips", "--n", "2", "--continuation"],
                 ["latents", "--n", "2", "--continuation"]):
        assert train_cli.main([*argv, "--out", str(out), "--smoke", "--quiet"]) == 0
    cfg = train_cli.PRESETS["s2v-mini"]
    mf, fm = cfg.dit.s2v.motion_frames, cfg.dit.s2v.lat_motion_frames
    clips = load_clips(out / "clips.pt")
    assert clips.video.shape[2] == 8 + mf  # smoke infer_frames 8, then the motion frames
    cont, first = LatentSet.load(out / "latents_cont.pt"), LatentSet.load(out / "latents.pt")
    assert cont.cont.all() and cont.motion.shape == (2, first.latents.shape[1], fm, *first.latents.shape[-2:])
    assert cont.latents.shape == first.latents.shape and first.motion is None
    vae = load_small_vae(out / "vae" / "vae.safetensors", torch.device("cpu"))
    with torch.no_grad():  # what the pipeline encodes for clip r > 0: the motion frames alone
        alone = vae.encode(clips.video_float(0)[None, :, :mf], chunked=False)[0]
        ref = vae.encode(clips.ref_float(0)[None, :, None], chunked=False)[0]
    torch.testing.assert_close(cont.motion[0], alone, atol=1e-4, rtol=1e-4)  # kernel rounding only
    torch.testing.assert_close(cont.latents[0, :, :1], ref, atol=1e-5, rtol=1e-5)
    both = LatentSet.cat([first, cont])
    assert both.cont.tolist() == [False, False, True, True] and not both.motion[:2].any()
    files = f"{out / 'latents.pt'},{out / 'latents_cont.pt'}"
    shipped = train_cli.Path(__import__("wanmoe").__file__).parent / "assets" / "s2v-mini" / "high_noise_model"
    moved = {}
    for frac in ("0", "1"):
        run = tmp_path / f"frac{frac}"
        assert train_cli.main(["expert", "--expert", "high", "--out", str(run), "--smoke", "--quiet", "--latents",
                               files, "--cont_frac", frac, "--init", str(shipped)]) == 0
        ck = torch.load(run / "experts" / "high.pt", weights_only=True)["model"]
        from wanmoe import checkpoint

        start = checkpoint.load_dit(shipped, dtype=torch.float32, cfg=cfg.dit).state_dict()
        moved[frac] = {k for k in start if not torch.equal(start[k], ck[k])}
    packer = {k for k in moved["1"] if k.startswith("frame_packer.")}
    assert packer and not any(k.startswith("frame_packer.") for k in moved["0"])
    # The packer can learn faster than the rest (it starts untrained): its own parameter group at 10x the rate.
    run = tmp_path / "mult"
    assert train_cli.main(["expert", "--expert", "high", "--out", str(run), "--smoke", "--quiet", "--latents",
                           files, "--cont_frac", "1", "--motion_lr_mult", "10"]) == 0
    groups = torch.load(run / "experts" / "high.pt", weights_only=True)["opt"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    # The high-noise expert's colour jitter is one draw per clip: its motion frames get the reference's (and the
    # targets') per-channel scale and bias, read back here by least squares from what the model was handed.
    from wanmoe.models.dit import DiT
    from wanmoe.train.loop import train_expert

    seen, real = [], DiT.forward

    def spy(self, x, t, ctx, *a, s2v=None, **k):  # noqa: ANN001, ANN002, ANN003
        seen.append((s2v.ref_latents.detach().clone(), s2v.motion_latents.detach().clone()))
        return real(self, x, t, ctx, *a, s2v=s2v, **k)

    data = LatentSet.cat([cont, cont])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiT, "forward", spy)
        train_expert(cfg, data, tmp_path / "jit", expert="high", steps=1, batch=1, cont_frac=1.0, motion_noise=0.0,
                     progress=False, ckpt_every=10)
    ref, motion = seen[0]
    c = ref.shape[1]
    for row in range(len(data.latents)):  # which clip was drawn: the one whose jittered reference fits exactly
        r0, m0 = data.latents[row, :, :1].reshape(c, -1), data.motion[row].reshape(c, -1)
        a = torch.stack([r0, torch.ones_like(r0)], -1)  # (C, n, 2): ref = scale * r0 + bias per channel
        sol = torch.linalg.lstsq(a, ref[0].reshape(c, -1, 1)).solution  # (C, 2, 1)
        if torch.allclose(a @ sol, ref[0].reshape(c, -1, 1), atol=1e-4):
            break
    assert not torch.allclose(sol[:, 0], torch.ones(c, 1))  # a jitter was applied
    torch.testing.assert_close(motion[0].reshape(c, -1), m0 * sol[:, 0] + sol[:, 1], atol=1e-4, rtol=1e-4)


def test_expert_checkpoint_from_before_the_motion_rate_resumes(tmp_path):
    """A checkpoint whose optimizer groups carry no "lr_mult" (written before --motion_lr_mult) resumes."""
    out = tmp_path / "run"
    for argv in (["clips", "--n", "2"], ["vae"], ["latents", "--n", "2"], ["expert", "--expert", "low"]):
        assert train_cli.main([*argv, "--out", str(out), "--smoke", "--quiet"]) == 0
    path = out / "experts" / "low.pt"
    ck = torch.load(path, weights_only=True)
    for group in ck["opt"]["param_groups"]:
        group.pop("lr_mult", None)
    torch.save(ck, path)
    assert train_cli.main(["expert", "--expert", "low", "--out", str(out), "--smoke", "--quiet", "--steps", "5"]) == 0
    assert torch.load(path, weights_only=True)["step"] == 5


def test_widened_dit_computes_what_the_narrow_one_did():
    """widen_dit_latent: on a latent whose new channels are zero, the widened DiT gives the old output on the old
    channels (kernel rounding only) and exactly 0 on the new ones; the config follows the latent."""
    from wanmoe.models.dit import DiT, S2VInputs
    from wanmoe.train.loop import latent_config, widen_dit_latent

    cfg = latent_config(train_cli.PRESETS["s2v-mini"], 16)  # s2v-mini as it was up to round 6
    wide = latent_config(cfg, 32)
    assert (wide.dit.in_dim, wide.dit.out_dim, wide.dit.s2v.cond_dim, wide.vae.z_dim) == (32, 32, 32, 32)
    assert wide.dit.dim == cfg.dit.dim and wide.with_vae(cfg.vae) == cfg
    torch.manual_seed(0)
    old = DiT(cfg.dit).eval()
    with torch.no_grad():
        old.head.head.weight.normal_(0, 0.05)
        old.head.head.bias.normal_(0, 0.05)
    new = DiT(wide.dit).eval()
    new.load_state_dict(widen_dit_latent(old.state_dict(), 16, 32))
    s = cfg.dit.s2v
    x, ref = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 16, 1, 8, 8)
    motion = torch.randn(1, 16, s.lat_motion_frames, 8, 8)
    audio, ctx, t = torch.randn(1, s.num_audio_layers, s.audio_dim, 12), torch.randn(1, 5, cfg.dit.text_dim), \
        torch.tensor([700.0])

    def pad(v):  # noqa: ANN001, ANN202
        return torch.cat([v, torch.zeros_like(v)], 1)

    with torch.no_grad():
        want = old(x, t, ctx, s2v=S2VInputs(audio, ref, motion, drop_motion_frames=False))
        got = new(pad(x), t, ctx, s2v=S2VInputs(audio, pad(ref), pad(motion), drop_motion_frames=False))
    assert got.shape == (1, 32, 3, 8, 8) and want.abs().max() > 0.1
    torch.testing.assert_close(got[:, :16], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, 16:], torch.zeros_like(got[:, 16:]))
    with pytest.raises(ValueError, match="only grow"):
        widen_dit_latent(new.state_dict(), 32, 16)


def test_a_small_model_retrained_on_a_wider_vae_trains_exports_and_loads(tmp_path):
    """The whole path of round 8: a 16-channel s2v-mini (what rounds 1-6 were), then its VAE widened to 32
    channels, latents, the experts started from the 16-channel ones (widened), export, and `wanmoe.load(folder)`
    finds the task with each folder's latent width and generates."""
    import wanmoe

    narrow, out = tmp_path / "narrow", tmp_path / "run"
    for argv in (["clips", "--n", "2"], ["vae", "--z_dim", "16"], ["latents", "--n", "2"],
                 ["expert", "--expert", "high"], ["expert", "--expert", "low"],
                 ["export", "--dest", str(tmp_path / "model16")]):
        assert train_cli.main([*argv, "--out", str(narrow), "--smoke", "--quiet"]) == 0, argv
    old = wanmoe.load(tmp_path / "model16")  # a folder of the 16-channel rounds loads under the 32-channel preset
    assert old.cfg.vae.z_dim == 16 and old.cfg.dit.in_dim == old.cfg.dit.s2v.cond_dim == 16
    (out / "clips.pt").parent.mkdir(parents=True)
    (out / "clips.pt").symlink_to(narrow / "clips.pt")
    for argv in (["vae", "--z_dim", "32", "--vae_init", str(tmp_path / "model16" / "vae.safetensors")],
                 ["latents", "--n", "2"],
                 ["expert", "--expert", "high", "--init", str(tmp_path / "model16" / "high_noise_model")],
                 ["expert", "--expert", "low", "--init", str(narrow / "experts" / "low.pt")],
                 ["export", "--dest", str(tmp_path / "model")]):
        assert train_cli.main([*argv, "--out", str(out), "--smoke", "--quiet"]) == 0, argv
    pipe = wanmoe.load(tmp_path / "model")
    assert pipe.cfg.task == "s2v-mini" and pipe.cfg.vae.z_dim == 32 and pipe.cfg.dit.in_dim == 32
    assert wanmoe.load("s2v-mini", ckpt_dir=tmp_path / "model").cfg.dit.out_dim == 32
    video = pipe(steps=2, seed=0)
    assert video.frames.shape[0] == 3 and torch.isfinite(video.frames).all()
    from wanmoe.cli import main
    from wanmoe.verify import verify_checkpoint

    assert verify_checkpoint(tmp_path / "model").ok
    assert main(["generate", "--ckpt_dir", str(tmp_path / "model"), "--sample_steps", "2",
                 "--save_file", str(tmp_path / "x.mp4")]) == 0 and (tmp_path / "x.mp4").is_file()


def test_decoder_tuned_on_the_models_own_latents(tmp_path):
    """`wanmoe train pairs` keeps exactly the latent the pipeline decodes (decoding the pair gives the video's
    frames), and `wanmoe train decoder` trains the decoder side only on (generated latent -> ground truth) crops:
    the loss on the pairs falls, the encoder and the latent statistics stay the shipped VAE's, and the written
    file loads as the model's VAE."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import wanmoe
    from wanmoe.train import decoder_tune as dt
    from wanmoe.train.clips import load_clips

    out = tmp_path / "run"
    assert train_cli.main(["clips", "--n", "2", "--out", str(out), "--quiet"]) == 0  # 128x128, as s2v-mini makes
    assert train_cli.main(["pairs", "--out", str(out), "--model", "s2v-mini", "--n", "1", "--start", "1",
                           "--smoke", "--quiet"]) == 0
    pairs, clips = dt.load_pair_files([out / "pairs.pt"])
    assert pairs.clip.tolist() == [1] and pairs.latents.shape[:3] == (1, 32, 3)  # [ref | 2 latents]: 8 frames
    pipe = wanmoe.load("s2v-mini")
    video = pipe(clips.prompts[1], image=clips.ref_float(1), audio=clips.audio[1, : clips.sr // 2].numpy(),
                 sr=clips.sr, seed=1, num_clip=1, steps=2, infer_frames=8)
    with torch.no_grad():
        frames = pipe.components.vae.decode(pairs.latents)[0]
    drop = pipe.cfg.dropped_frames(start_from_ref=False)
    torch.testing.assert_close(frames[:, 1 + drop :], video.frames, atol=1e-4, rtol=0)

    shipped = pipe.components.vae.cfg
    vae_file = train_cli.Path(wanmoe.__file__).parent / "assets" / "s2v-mini" / "vae.safetensors"
    g = torch.Generator().manual_seed(0)
    z, x, _ = dt.pair_crops(pairs, load_clips(out / "clips.pt"), g, 1, 32, 8, 4, None, 0.0)
    assert z.shape == (1, 32, 3, 4, 4) and x.shape == (1, 3, 9, 32, 32)
    z, x = pairs.latents, torch.cat([clips.ref_float(1)[:, None], clips.video_float(1)[:, :8]], 1)[None]

    def loss_on(vae_path):  # noqa: ANN001, ANN202 (the whole pair: what training on random crops of it lowers)
        from wanmoe.loading import load_small_vae

        with torch.no_grad():
            rec = load_small_vae(vae_path, torch.device("cpu")).decode(z, clamp=False, chunked=False)
        return (torch.nn.functional.l1_loss(rec, x) + torch.nn.functional.mse_loss(rec, x)).item()

    written = dt.tune_decoder(vae_file, clips, pairs, tmp_path / "tuned", steps=12, batch=2, crop=32, lr=3e-4,
                              warmup=0, mouth_p=0.0, mouth_weight=0.0, progress=False)
    before, after = loss_on(vae_file), loss_on(written)
    assert after < 0.97 * before
    old, new = load_file(str(vae_file)), load_file(str(written))
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith(("encoder.", "conv1.")))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    with safe_open(str(written), "pt") as f:
        assert f.metadata()["config"] and json.loads(f.metadata()["config"])["mean"] == list(shipped.mean)
    # The CLI's decoder stage (smoke: two steps), stopped at step 1 of its cosine and then continued.
    argv = ["decoder", "--out", str(tmp_path / "cli"), "--pairs", str(out / "pairs.pt"), "--vae_init", str(vae_file),
            "--smoke", "--quiet"]
    assert train_cli.main([*argv, "--stop_step", "1"]) == 0
    from wanmoe.train.state import load_tensors

    assert load_tensors(tmp_path / "cli" / "decoder_ckpt.pt")["step"] == 1
    assert (tmp_path / "cli" / "vae" / "vae.safetensors").is_file()
    assert train_cli.main(argv) == 0 and load_tensors(tmp_path / "cli" / "decoder_ckpt.pt")["step"] == 2

    # --mouth_anchor: inside the mouth box the target is the anchor's decode of the same latent, elsewhere the truth.
    from wanmoe.loading import load_small_vae
    from wanmoe.train.vae_train import mouth_boxes

    anchor = load_small_vae(vae_file, torch.device("cpu"))
    boxes = mouth_boxes(clips)
    zc, xc, mc = dt.pair_crops(pairs, clips, torch.Generator().manual_seed(1), 2, 32, 8, 4, boxes, 1.0)
    assert 0 < mc.mean() < 1
    target = dt.anchored_target(xc, mc, zc, anchor)
    with torch.no_grad():
        dec = anchor.decode(zc, clamp=False, chunked=False)
    m = mc.expand_as(xc).bool()
    assert torch.equal(target[~m], xc[~m]) and torch.equal(target[m], dec[m]) and not torch.equal(dec[m], xc[m])
    # Tuned with the shipped decoder as the anchor, the mouth stays nearer the shipped decoder's mouth than when it
    # learns the truth there too.
    y0, y1, x0, x1 = boxes[1]

    def mouth_gap(vae_path):  # noqa: ANN001, ANN202 (L1 to the anchor's decode inside the box, whole pair)
        with torch.no_grad():
            rec = load_small_vae(vae_path, torch.device("cpu")).decode(z, clamp=False, chunked=False)
            ref = anchor.decode(z, clamp=False, chunked=False)
        return (rec - ref)[..., y0:y1, x0:x1].abs().mean().item()

    kw = dict(steps=12, batch=2, crop=32, lr=3e-4, warmup=0, mouth_p=1.0, mouth_weight=2.0, progress=False)
    free = dt.tune_decoder(vae_file, clips, pairs, tmp_path / "free", **kw)
    held = dt.tune_decoder(vae_file, clips, pairs, tmp_path / "held", mouth_anchor=vae_file, **kw)
    assert mouth_gap(held) < 0.5 * mouth_gap(free)
