"""``auto`` layout fields train end to end: the layout the search ranks first, recorded, repeatable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import saved_model
from launching import compose, local_run, metrics, run_recipe, tail
from pipefit.config import validate
from pipefit.partition.search import search_run

pytestmark = pytest.mark.slow

STEPS = 3
AUTO = ["pipeline.stages=auto", "train.micro_batch_size=auto", "pipeline.activation_checkpoint_interval=auto"]


def test_auto_layout_trains_the_search_pick_and_repeats_exactly(tmp_path: Path) -> None:
    folder, _ = saved_model(tmp_path, "llama")
    shape = ("train.micro_batch_size=", "train.grad_accum_steps=", "output_dir=")
    base = [o for o in local_run(folder, tmp_path / "unused", STEPS) if not o.startswith(shape)]
    base += ["hardware=cpu", "train.global_batch_size=4"]
    # A memory cap under what any one-stage layout needs, so the pick is a 2-stage pipeline.
    roomy = search_run(validate(compose(base)), 2, zero_stages=[1], schedules=["1f1b"])
    one_stage = min(c["peak_memory_bytes"] for c in roomy["candidates"] if c["pp"] == 1)
    assert any(c["pp"] == 2 and c["peak_memory_bytes"] < 0.99 * one_stage for c in roomy["candidates"])
    cap = f"hardware.memory_gib={0.99 * one_stage / 2**30:.9f}"

    out = tmp_path / "auto"
    overrides = [*base, cap, *AUTO, f"output_dir={out}"]
    ranked = search_run(
        validate(compose(overrides)), 2, zero_stages=[1], schedules=["1f1b"]
    )  # auto keeps the run's schedule
    best = ranked["candidates"][0]
    assert best is ranked["best"] and best["pp"] == 2
    proc = run_recipe(overrides)
    assert proc.returncode == 0, tail(proc)

    part = json.loads((out / "partition.json").read_text())
    chosen = part["auto_layout"]
    for key in ("pp", "dp", "micro_batch_size", "grad_accum_steps", "activation_checkpoint_interval", "boundaries"):
        assert chosen[key] == best[key], key
    assert chosen["predicted_step_s"] == pytest.approx(best["predicted_step_s"], rel=1e-12)
    assert part["boundaries"] == best["boundaries"]
    assert sorted(r["layers"] for r in part["ranks"]) == [best["boundaries"][0:2], best["boundaries"][1:3]]
    recorded = OmegaConf.load(out / "config.yaml")
    p, t = recorded.pipeline, recorded.train
    assert (p.stages, t.micro_batch_size, t.grad_accum_steps, p.activation_checkpoint_interval) == (
        best["pp"], best["micro_batch_size"], best["grad_accum_steps"], best["activation_checkpoint_interval"],
    )  # fmt: skip
    assert (p.partition, list(p.boundaries)) == ("manual", best["boundaries"])
    assert "layout search (pipeline.stages=auto, " in (out / "train.log").read_text()

    # The same layout, given explicitly: the same losses, bit for bit.
    explicit = tmp_path / "explicit"
    given = [
        f"pipeline.stages={best['pp']}",
        f"train.micro_batch_size={best['micro_batch_size']}",
        f"train.grad_accum_steps={best['grad_accum_steps']}",
        f"pipeline.activation_checkpoint_interval={best['activation_checkpoint_interval']}",
        "pipeline.partition=manual",
        f"pipeline.boundaries=[{','.join(map(str, best['boundaries']))}]",
    ]
    proc = run_recipe([*base, cap, *given, f"output_dir={explicit}"])
    assert proc.returncode == 0, tail(proc)
    auto_losses = [m["loss"] for m in metrics(out)]
    assert len(auto_losses) == STEPS
    assert auto_losses == [m["loss"] for m in metrics(explicit)]
