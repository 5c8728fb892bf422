"""Pipeline training equals ordinary training (real ranks on CPU with gloo, launched by accelerate).

Each case trains a tiny HF model as a DeepSpeed pipeline through ``recipes/finetune.py``, then
trains the unmodified HF model in this process on the same global batches
(:func:`pipefit.parity.reference.train_reference`) and compares per-step losses and final weights.
"""

from __future__ import annotations

import email
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import saved_model
from launching import compose, local_run, losses_match, metrics, run_recipe, tail, weights_match
from pipefit.config import validate
from pipefit.parity.reference import train_reference
from pipefit.partition.plan import predicted_stage_memory
from pipefit.run.preflight import Prepared

pytestmark = pytest.mark.slow

STEPS = 5
# Short lines of prose from the standard library, one document a line: rows of 32 tokens pack several.
PACK_TEXT = Path(email.__file__).parent / "architecture.rst"


def _overrides(folder: Path, out: Path, zero: int, extra: list[str]) -> list[str]:
    return local_run(folder, out, STEPS, f"zero.stage={zero}", *extra, accum=3, warmup=2)


@pytest.mark.parametrize(
    "family,ranks,zero,extra",
    [
        ("llama", 2, 1, ["pipeline.partition=manual", "pipeline.boundaries=[0,2,6]"]),
        ("gpt2", 4, 1, ["pipeline.partition=uniform"]),
        ("qwen2", 4, 0, []),
        ("llama", 4, 1, ["pipeline.stages=4", "pipeline.partition=manual", "pipeline.boundaries=[0,1,3,5,6]"]),
        ("llama", 2, 1, ["data=text", f"data.data_files=[{PACK_TEXT}]", "data.layout=pack"]),
    ],
    ids=[
        "llama-pp2-zero1-manual",
        "gpt2-pp2xdp2-zero1-tied",
        "qwen2-pp2xdp2-zero0-tied",
        "llama-pp4-zero1-embedding-alone",
        "llama-pp2-packed-documents",
    ],
)
def test_pipeline_training_matches_single_process(tmp_path: Path, family: str, ranks: int, zero: int, extra: list[str]):
    folder, initial = saved_model(tmp_path, family)
    out = tmp_path / "run"
    overrides = _overrides(folder, out, zero, extra)
    proc = run_recipe(overrides, num_processes=ranks)
    assert proc.returncode == 0, tail(proc)

    run = validate(compose(overrides))
    prepared = Prepared(run, ranks)
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    ref_losses = train_reference(reference, run, prepared.batches, STEPS)
    losses_match(out, ref_losses, STEPS)
    # The model learns: weights moved well beyond the comparison tolerance.
    weights_match(AutoModelForCausalLM.from_pretrained(out / "hf_model"), reference, initial)

    # The stages hold exactly the requested partition.
    import json

    part = json.loads((out / "partition.json").read_text())
    assert part["boundaries"] == prepared.boundaries
    for r in part["ranks"]:
        s = r["stage"]
        assert r["layers"] == prepared.boundaries[s : s + 2]
    if "pipeline.boundaries=[0,2,6]" in extra:
        assert prepared.boundaries == [0, 2, 6]
    assert len(part["ranks"]) == ranks

    # ZeRO-1 shards Adam's two fp32 moments over the data-parallel replicas of each stage: each rank
    # holds 8 bytes x (its stage's parameters) / dp (up to alignment padding); ZeRO-0 holds them all.
    dp = ranks // run.pipeline.stages
    for r in part["ranks"]:
        full = 8 * r["params"]
        expected = full / dp if zero == 1 else full
        assert abs(r["optimizer_state_bytes"] - expected) <= 0.01 * expected, (r, expected)
        # Each rank's measured peak (above its baseline) and the plan's prediction for its stage.
        assert r["peak_memory_bytes"] > 0 and r["baseline_memory_bytes"] > 0
        assert (
            r["predicted_memory_bytes"]
            == predicted_stage_memory(prepared.skeleton, prepared.workload, prepared.boundaries, run.hardware)[
                r["stage"]
            ]
        )
    print("optimizer state bytes per rank:", [(r["rank"], r["optimizer_state_bytes"]) for r in part["ranks"]])


def test_default_recipe_learns_and_exports_loadable_folder(tmp_path: Path):
    """The embedded default (tiny Llama, offline tokenizer and text), shortened: loss falls, export reloads."""
    out = tmp_path / "run"
    proc = run_recipe(["train.max_steps=12", f"output_dir={out}"])
    assert proc.returncode == 0, tail(proc)
    # The console: the plan (2 stages), one line per step, the result. Besides, only what the launcher
    # process prints before any rank runs: DeepSpeed's accelerator line (once, was 3x: the ranks' go to
    # train.log) and accelerate's notice when port 29500 is taken by another run.
    lines = (proc.stdout + proc.stderr).splitlines()
    launcher = ("real_accelerator.py", "Port `29500` is already in use", "  warnings.warn(")
    ours = [x for x in lines if not any(m in x for m in launcher)]
    # The plan is the partition line and one line per stage; after the steps, one line of peak memory.
    assert len(ours) == 1 + 2 + 12 + 1 + 1, ours
    assert all(
        re.fullmatch(r"\[[-0-9 :,]+\]\[pipefit\]\[INFO\] (partition=|stage |step |peak memory |exported ).*", x)
        for x in ours
    ), ours
    assert sum("Setting accelerator" in x for x in lines) == 1, lines
    log = (out / "train.log").read_text()
    assert "[pipefit.library][DEBUG] SEED_LAYERS=False" in log and "Using topology" in log
    assert log.count("][pipefit][INFO] step ") == 12
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.5, losses
    rec = metrics(out)[0]
    assert {"step", "loss", "lr", "tokens_per_s", "wall_time_s"} <= set(rec)
    assert rec["lr"] > 0

    # from_pretrained in a fresh interpreter with no pipefit import reproduces the pipeline's logits.
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d = sys.argv[1]\n"
        "probe = load_file(d + '/pipeline_probe.safetensors')\n"
        "m = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "AutoTokenizer.from_pretrained(d)\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=probe['input_ids'], position_ids=probe['position_ids']).logits\n"
        "assert 'pipefit' not in sys.modules\n"
        "print((out - probe['logits']).abs().max().item())\n"
    )
    import subprocess
    import sys

    check = subprocess.run([sys.executable, "-c", script, str(out / "hf_model")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    assert float(check.stdout.strip().splitlines()[-1]) <= 1e-5
    probe = load_file(out / "hf_model" / "pipeline_probe.safetensors")
    assert probe["logits"].shape[-1] == 4096


def test_plain_use_deepspeed_form_honours_accelerate_zero_stage(tmp_path: Path):
    """``accelerate launch --use_deepspeed --num_processes 2 --zero_stage 0`` with no accelerate config file."""
    folder, _ = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    base = [
        "model=local",
        f"model.path={folder}",
        "data.seq_len=32",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        f"output_dir={out}",
    ]
    proc = run_recipe(base, launcher_args=["--use_deepspeed", "--zero_stage", "0"])
    assert proc.returncode == 0, tail(proc)
    import json

    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["train_batch_size"] == 2 * 2 * 1

    conflict = run_recipe([*base, "zero.stage=1"], launcher_args=["--use_deepspeed", "--zero_stage", "0"])
    assert conflict.returncode != 0
    assert "zero.stage=1 (Hydra override) conflicts with accelerate --zero_stage 0" in conflict.stderr + conflict.stdout


def test_fewer_ranks_than_stages_is_a_clear_error(tmp_path: Path):
    """Plain ``--num_processes 2`` without DeepSpeed on a CPU machine starts one process: say so."""
    out = tmp_path / "run"
    proc = run_recipe([f"output_dir={out}"], launcher_args=["--cpu"], num_processes=1)
    assert proc.returncode != 0
    assert "pipeline.stages=2 needs at least 2 ranks but this launch has 1" in proc.stderr
    assert not out.exists()


def test_cost_model_partitions_reach_every_rank(tmp_path: Path):
    """``flops`` gives the boundaries the planner computes; ``profile`` is measured once and shared."""
    import json

    from pipefit.partition import costs
    from pipefit.partition.boundaries import boundaries_for

    for method in ("flops", "profile"):
        out = tmp_path / method
        overrides = [f"pipeline.partition={method}", "train.max_steps=2", "train.export=false", f"output_dir={out}"]
        proc = run_recipe(overrides, env={"PIPEFIT_CACHE_DIR": str(tmp_path / "cache")})
        assert proc.returncode == 0, tail(proc)
        part = json.loads((out / "partition.json").read_text())
        assert part["method"] == method
        b = part["boundaries"]
        assert sorted((r["layers"][0], r["layers"][1]) for r in part["ranks"]) == list(zip(b[:-1], b[1:], strict=True))
        if method == "flops":
            run = validate(compose(overrides))
            prepared = Prepared(run, 2)
            expected = boundaries_for(
                prepared.skeleton, "flops", 2, None, workload=costs.Workload.from_run(run, 1), hardware=run.hardware
            )
            assert b == expected
