"""pipeline.schedule=zb1p trains exactly as 1f1b (real ranks on CPU with gloo, launched by accelerate).

Each case trains the same tiny model twice, with DeepSpeed's 1F1B and with ZB-H1 (split backward,
weight passes deferred), and compares per-step losses and the exported weights (relative 1e-6).
1F1B itself equals the single-process reference (tests/run/test_training.py). The zb1p run is
traced, so the test also sees that B and W really ran, and rank 0's log that its Linear weights were split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import saved_model
from launching import local_run, metrics, run_recipe, tail

pytestmark = pytest.mark.slow

STEPS = 3
ACCUM = 4


@pytest.mark.parametrize(
    "family,ranks,extra",
    [
        ("llama", 2, ["zero.stage=0", "pipeline.activation_checkpoint_interval=1"]),
        ("gpt2", 4, ["zero.stage=1"]),
        (
            "llama",
            4,
            ["zero.stage=1", "pipeline.stages=4", "pipeline.partition=manual", "pipeline.boundaries=[0,1,3,5,6]"],
        ),
        ("llama", 2, ["zero.stage=1", "train.precision=bf16", "lora=qv"]),
    ],
    ids=[
        "llama-pp2-zero0-checkpointing",
        "gpt2-pp2xdp2-zero1-tied",
        "llama-pp4-zero1-embedding-alone",
        "llama-pp2-zero1-bf16-lora",
    ],
)
def test_zb1p_trains_exactly_as_1f1b(tmp_path: Path, family: str, ranks: int, extra: list[str]):
    folder, _ = saved_model(tmp_path, family)
    runs = {}
    for schedule in ("1f1b", "zb1p"):
        out = tmp_path / schedule
        traced = ["train.trace=true"] if schedule == "zb1p" else []
        overrides = local_run(folder, out, STEPS, f"pipeline.schedule={schedule}", *traced, *extra, accum=ACCUM)
        proc = run_recipe(overrides, num_processes=ranks)
        assert proc.returncode == 0, tail(proc)
        runs[schedule] = out

    losses = {s: [m["loss"] for m in metrics(out) if "loss" in m] for s, out in runs.items()}
    assert len(losses["zb1p"]) == STEPS
    for a, b in zip(losses["zb1p"], losses["1f1b"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), losses
    trained = {s: AutoModelForCausalLM.from_pretrained(out / "hf_model").state_dict() for s, out in runs.items()}
    for name, ref in trained["1f1b"].items():
        torch.testing.assert_close(trained["zb1p"][name], ref, rtol=1e-6, atol=1e-7, msg=name)

    # Every rank ran one B and one W per micro-batch, and every stage deferred some weight gradients.
    trace = json.loads((runs["zb1p"] / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = [e.get("name") for e in events]
    assert names.count("BackwardInput") == names.count("BackwardWeight") == ranks * STEPS * ACCUM
    assert "BackwardPass" not in names
    log = (runs["zb1p"] / "train.log").read_text()
    # train.log holds rank 0's lines: stage 0 split its block projections (none: the embedding alone).
    split = re.findall(r"pipeline\.schedule=zb1p: stage 0 defers the weight gradients of (\d+) layers", log)
    assert len(split) == 1 and (int(split[0]) == 0) == ("pipeline.boundaries=[0,1,3,5,6]" in extra), split
