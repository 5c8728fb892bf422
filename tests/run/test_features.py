"""Training features: activation checkpointing, bf16/fp16, evaluation every N steps, progress bar, TensorBoard.

The multi-process runs (``slow``) compare with the single-process HF reference
(:mod:`pipefit.parity.reference`): a Llama pp=2 x dp=2 run with activation checkpointing at every layer,
evaluation every 2 steps on padded rows (so the token weighting matters) and TensorBoard; and a
bf16 and an fp16 run (one matrix frozen) against the fp32 reference.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import saved_model
from launching import REPO, compose, local_run, metrics, require_precision, run_recipe, tail
from pipefit.config import ConfigError, RunConfig, validate
from pipefit.data.batches import BatchLayout, GlobalBatches
from pipefit.model import lora as trainable
from pipefit.parity.reference import evaluate_reference, train_reference
from pipefit.run.precision import export_dtype
from pipefit.run.preflight import Prepared, eval_rounds
from pipefit.run.reporting import _Reporter

# --- fast: configuration errors, evaluation rounds, export dtype, the progress bar ---------------


def test_eval_every_without_eval_data_is_a_one_line_error() -> None:
    cfg = compose(["train.eval_every=5"])
    with pytest.raises(ConfigError, match=r"^train\.eval_every=5 needs evaluation data; set data\.eval_fraction"):
        validate(cfg)
    validate(compose(["train.eval_every=5", "data.eval_fraction=0.1"]))  # with held-out rows: fine
    with pytest.raises(ConfigError, match=r"train\.eval_batches=-1 is not accepted; expected a number >= 0"):
        validate(compose(["train.eval_batches=-1"]))


def test_the_default_partition_is_priced_and_logged_with_its_method(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from pipefit.partition.boundaries import boundaries_for
    from pipefit.run.reporting import log_plan

    prepared = Prepared(validate(compose([])), 2)
    assert prepared.run.pipeline.partition == "flops"
    # llama_tiny: the cost-based split moves a block to the stage of the (expensive) head.
    assert prepared.boundaries == [0, 4, 7]
    assert boundaries_for(prepared.skeleton, "parameters", 2, None) == [0, 3, 7]
    with caplog.at_level(logging.INFO, logger="pipefit"):
        log_plan(prepared)
    assert caplog.messages[0] == "partition=flops: boundaries [0, 4, 7]"
    assert caplog.messages[1].startswith("stage 0: layers [0, 4)")


def test_eval_rounds() -> None:
    batches = GlobalBatches(torch.zeros(10, 9, dtype=torch.long), BatchLayout(2, 1, 2), seed=0, what="evaluation")
    assert batches.steps_per_epoch == 2  # 10 rows, 4 per round
    assert eval_rounds(0, batches) == 2  # 0: every complete round
    assert eval_rounds(1, batches) == 1
    assert eval_rounds(3, None) == 0
    with pytest.raises(ConfigError, match=r"train\.eval_batches=3 is more than .* 2 rounds of 4 rows; accepted: 0"):
        eval_rounds(3, batches)


class _Accelerator:
    def __init__(self, fp16: bool, bf16: bool) -> None:
        self.fp16, self.bf16 = fp16, bf16

    def is_fp16_supported(self) -> bool:
        return self.fp16

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def device_name(self) -> str:
        return "cpu"


def test_unsupported_precision_is_a_one_line_error_before_any_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.accelerator

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _Accelerator(fp16=False, bf16=True))
    run = validate(compose(["train.precision=fp16"]))
    with pytest.raises(ConfigError) as err:
        Prepared(run, world_size=2)  # raised first thing: no model, data or process group
    assert str(err.value) == (
        "train.precision=fp16 is not supported on this cpu device (DeepSpeed accelerator _Accelerator); "
        "accepted here: fp32, bf16"
    )
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _Accelerator(fp16=True, bf16=False))
    with pytest.raises(ConfigError, match=r"^train\.precision=bf16 is not supported .* accepted here: fp32, fp16$"):
        Prepared(validate(compose(["train.precision=bf16"])), world_size=2)


def test_a_precision_this_machine_lacks_skips_its_run_with_the_reason() -> None:
    lacks_fp16 = _Accelerator(fp16=False, bf16=True)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_precision("fp16", lacks_fp16)
    assert skipped.value.msg == (
        "train.precision=fp16 is not supported on this cpu device (DeepSpeed accelerator _Accelerator); "
        "accepted here: fp32, bf16"
    )
    require_precision("bf16", lacks_fp16)  # supported: the test runs
    require_precision("fp32", _Accelerator(fp16=False, bf16=False))


def test_export_dtype_follows_the_model_config() -> None:
    from transformers import LlamaConfig

    assert export_dtype(LlamaConfig()) == torch.float32  # no dtype named
    assert export_dtype(LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert export_dtype(LlamaConfig(dtype=torch.float16)) == torch.float16


def test_step_time_waits_for_the_device_queue() -> None:
    """train_batch returns once a GPU's kernels are queued: the step's time includes the synchronise."""
    from pipefit.run.loop import timed_train_batch

    now = [100.0]
    events: list[str] = []

    class QueuedEngine:
        def train_batch(self) -> torch.Tensor:
            now[0] += 0.5  # the host's part of the step
            events.append("train_batch")
            return torch.tensor(2.0)

    def synchronize() -> None:
        now[0] += 4.0  # the kernels still queued
        events.append("synchronize")

    loss, dt = timed_train_batch(QueuedEngine(), synchronize=synchronize, clock=lambda: now[0])
    assert (float(loss), dt, events) == (2.0, 4.5, ["train_batch", "synchronize"])


def _record(step: int, **extra: float) -> dict:
    return {"step": step, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "step_time_s": 0.1, **extra}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("rank", "progress_bar", "tty", "shown"),
    [(0, True, True, True), (1, True, True, False), (0, False, True, False), (0, True, False, False)],
    ids=["rank0-terminal", "rank1", "switched-off", "not-a-terminal"],
)
def test_progress_bar_only_on_rank_0_at_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rank: int, progress_bar: bool, tty: bool, shown: bool
) -> None:
    stream = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    run = RunConfig()
    run.train.max_steps, run.train.progress_bar = 4, progress_bar
    reporter = _Reporter(SimpleNamespace(stage_id=0, device="cpu"), run, tmp_path, rank, first=1)
    reporter.step(_record(2, eval_loss=2.25), {})
    reporter.close()
    text = stream.getvalue()
    if shown:
        assert "2/4" in text and "loss=2.5000" in text and "eval=2.2500" in text and "tok/s=100" in text, text
    else:
        assert text == ""
    assert not (tmp_path / "tensorboard").exists()  # train.tensorboard is off by default


@pytest.mark.parametrize(
    ("first", "kept"), [(0, []), (2, [1, 2]), (5, [1, 2, 3, 4])], ids=["fresh", "resume-2", "past"]
)
def test_a_launch_keeps_one_history_in_metrics(tmp_path: Path, first: int, kept: list[int]) -> None:
    """A launch starting at step first+1 drops what an earlier launch logged beyond ``first``:
    a rerun from scratch or a resume from an older checkpoint never leaves a step twice."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5')
    run = RunConfig()
    _Reporter(SimpleNamespace(stage_id=0, device="cpu"), run, tmp_path, 1, first=first).close()
    assert len(path.read_text().splitlines()) == 5  # rank 1 leaves the file alone
    _Reporter(SimpleNamespace(stage_id=0, device="cpu"), run, tmp_path, 0, first=first).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == kept


# --- activation checkpointing: bytes held for backward, measured in one process ------------------


def test_activation_checkpointing_holds_less_for_backward_and_changes_nothing() -> None:
    """The llama_tiny preset shape (hidden 256, 4 blocks, seq 128, micro-batch 4) as one stage."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "activation_memory.py"), "--shapes=tiny", "--json", "--no-timing"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["interval"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["results"]["tiny"]}
    print({k: (r["bytes"], round(r["ratio"], 3)) for k, r in rows.items()})
    none, every, pairs = rows[0], rows[1], rows[2]
    # Without checkpointing every block keeps ~10 MiB of activations; with it, only each range's input
    # (and the loss's logits) stays: measured 49.6 MiB -> 11.0 MiB (interval 1), 9.5 MiB (interval 2).
    assert none["bytes"] > 40 * 2**20
    assert every["ratio"] < 0.3 and pairs["ratio"] < 0.3
    # Recomputation gives bit-identical losses and gradients (the embedding's included).
    for r in (every, pairs):
        assert r["loss_diff"] == 0.0 and r["grad_max_diff"] == 0.0


# --- multi-process runs ---------------------------------------------------------------------------

STEPS = 4


def _overrides(folder: Path, out: Path, extra: list[str]) -> list[str]:
    return local_run(folder, out, STEPS, "pipeline.partition=manual", "pipeline.boundaries=[0,2,6]", *extra)


@pytest.mark.slow
def test_checkpointing_evaluation_and_tensorboard_match_single_process(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    # Short lines of different lengths, one padded row each: rows hold different numbers of targets,
    # so the token weighting matters.
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    lines = [" ".join(words[i * 40 : i * 40 + 2 + (i * 7) % 23]) for i in range(120)]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines) + "\n")
    overrides = _overrides(
        folder,
        out,
        [
            "pipeline.activation_checkpoint_interval=1",
            "data=text",
            f"data.data_files=[{text}]",
            "data.layout=pad",
            "data.eval_fraction=0.1",
            "train.eval_every=2",
            "train.eval_batches=2",
            "train.tensorboard=true",
        ],
    )
    proc = run_recipe(overrides, num_processes=4)  # pp=2 x dp=2
    assert proc.returncode == 0, tail(proc)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["pipeline"] == {"activation_checkpoint_interval": 1, "use_reentrant": False}

    run = validate(compose(overrides))
    prepared = Prepared(run, 4)
    assert prepared.eval_batches is not None and prepared.eval_rounds == 2
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    ref_eval: dict[int, tuple[float, int]] = {}

    def after(step: int) -> None:
        if step % 2 == 0:
            ref_eval[step] = evaluate_reference(reference, prepared.eval_batches, 2)

    ref_losses = train_reference(reference, run, prepared.batches, STEPS, after_step=after)
    records = metrics(out)
    # Checkpointed pipeline training equals ordinary training.
    losses = [m["loss"] for m in records]
    assert max(abs(a - b) / b for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5, (losses, ref_losses)

    # Validation loss = the HF model's token-weighted loss on the same held-out rows after the same steps.
    evals = {m["step"]: m for m in records if "eval_loss" in m}
    assert sorted(evals) == [2, 4]
    for step, (loss, tokens) in ref_eval.items():
        got = evals[step]
        print(f"step {step}: eval loss {got['eval_loss']:.7f} reference {loss:.7f} ({tokens} tokens)")
        assert got["eval_loss"] == pytest.approx(loss, rel=1e-5)
        assert got["eval_tokens"] == tokens
        assert got["eval_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    # The weighting is not a detail here: the plain mean of the micro-batch means (what averaging
    # eval_batch's per-micro-batch losses would give) is another number, over 10x the tolerance away.
    reference.eval()
    means = []
    with torch.no_grad():
        for step in range(2):
            for r in range(2):
                for (ids, pos), (targets, _) in prepared.eval_batches.micro_batches(step, r):
                    logits = reference(input_ids=ids, position_ids=pos).logits
                    means.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())))
    naive = sum(means) / len(means)
    print(f"unweighted mean of micro-batch means {naive:.7f} vs token-weighted {ref_eval[4][0]:.7f}")
    assert abs(naive - ref_eval[4][0]) > 10 * 1e-5 * ref_eval[4][0]

    # TensorBoard: one event file (rank 0's), holding exactly what metrics.jsonl holds.
    files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")):
        assert [v for _, v in scalars[tag]] == pytest.approx([m[key] for m in records], rel=1e-6), tag
    assert scalars["eval/loss"] == [(s, pytest.approx(evals[s]["eval_loss"], rel=1e-6)) for s in (2, 4)]
    assert [s for s, _ in scalars["eval/ppl"]] == [2, 4]
    for stage in (0, 1):
        times = [v for _, v in scalars[f"stage_step_time_s/stage{stage}"]]
        assert len(times) == STEPS and all(t > 0 for t in times)
    # stderr is not a terminal here: no progress bar, and the log lines are still there.
    assert "tok/s=" not in proc.stderr
    assert "eval loss" in (out / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_run_tracks_the_fp32_reference(tmp_path: Path, precision: str) -> None:
    require_precision(precision)  # e.g. fp16 on a CPU whose DeepSpeed accelerator has none: skipped, reason given
    folder, initial = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    # grad_clip below the gradient norm (~1.4), so clipping by the global norm is exercised.
    # One frozen matrix: it has no fp32 master, and must still be exported exactly as loaded.
    frozen = "model.layers.0.mlp.down_proj.weight"
    overrides = _overrides(
        folder, out, [f"train.precision={precision}", "optim.grad_clip=0.5", "zero.stage=1", f"train.freeze=[{frozen}]"]
    )
    proc = run_recipe(overrides, num_processes=2)
    assert proc.returncode == 0, tail(proc)
    part = json.loads((out / "partition.json").read_text())
    assert {r["param_dtype"] for r in part["ranks"]} == {"bf16": {"bfloat16"}, "fp16": {"float16"}}[precision]
    if precision == "bf16":
        assert json.loads((out / "ds_config.json").read_text())["data_types"] == {"grad_accum_dtype": "fp32"}

    # The fp32 reference is another run than the one in ``out`` (which it may not be prepared into).
    reference_overrides = [
        o for o in overrides if o != f"train.precision={precision}" and not o.startswith("output_dir=")
    ]
    run = validate(compose(reference_overrides))
    prepared = Prepared(run, 2)
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    reference = trainable.reference_model(reference, run)
    assert not reference.get_parameter(frozen).requires_grad
    norms: list[float] = []
    ref_losses = train_reference(reference, run, prepared.batches, STEPS, grad_norms=norms)
    records = metrics(out)
    loss_rel = max(abs(m["loss"] - b) / b for m, b in zip(records, ref_losses, strict=True))
    norm_rel = max(abs(m["grad_norm"] - n) / n for m, n in zip(records, norms, strict=True))
    print(f"{precision} vs fp32 reference: loss rel diff {loss_rel:.2e}, grad norm rel diff {norm_rel:.2e}")
    assert 0 < loss_rel <= 1e-3  # half precision really computed, and close
    assert norm_rel <= 1e-2  # the norm covers both stages (one stage's share would be far off)

    # The export holds the fp32 master weights (the config's dtype, float32), and those started from the
    # loaded fp32 values, not from bf16-rounded copies: embedding rows of tokens no batch contained only
    # decay (AdamW), exactly as in the fp32 reference (a bf16 copy or a bf16 start: ~2e-4 off).
    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model", dtype=torch.float32).state_dict()
    assert all(w.dtype == torch.float32 for w in exported.values())
    ref_sd, init_sd = reference.state_dict(), initial.state_dict()
    seen = torch.zeros(ref_sd["model.embed_tokens.weight"].shape[0], dtype=torch.bool)
    for step in range(STEPS):
        for (ids, _), _ in prepared.batches.micro_batches(step, 0):
            seen[ids.flatten()] = True
    key = "model.embed_tokens.weight"
    unseen_diff = float((exported[key][~seen] - ref_sd[key][~seen]).abs().max())
    # The update itself: bf16 forward/backward, so within a few percent (Frobenius) of the fp32 one.
    err = sum(float((exported[k] - ref_sd[k]).pow(2).sum()) for k in ref_sd)
    update = sum(float((ref_sd[k] - init_sd[k]).pow(2).sum()) for k in ref_sd)
    print(
        f"unseen embedding rows ({int((~seen).sum())}): max |diff| {unseen_diff:.1e}; "
        f"update rel error {math.sqrt(err / update):.3f}"
    )
    assert int((~seen).sum()) > 1000 and unseen_diff <= 1e-7
    assert torch.equal(exported[frozen], init_sd[frozen])  # not a rounded half-precision copy
    assert math.sqrt(err / update) <= 0.05
