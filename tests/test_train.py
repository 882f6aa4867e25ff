"""Smoke-trains every stage of the embedded model's recipe at toy sizes, then generates with the result."""

from __future__ import annotations

import json

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


def test_expert_sigma_sampling_stays_in_range():
    from wanmoe.train.loop import sample_sigmas

    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(10000, 0.9, 1.0, 5.0, g)
    assert s.min() >= 0.9 - 1e-6 and s.max() <= 1.0 + 1e-6
    s = sample_sigmas(10000, 0.0, 0.9, 5.0, g)
    assert s.min() >= 0.0 and s.max() <= 0.9 + 1e-6
    # Distributed like the sampler's shifted steps: with shift 5 most mass sits at high sigma.
    assert (sample_sigmas(10000, 0.0, 1.0, 5.0, g) > 0.5).float().mean() > 0.7
