"""The layout search (``pipefit plan --search``, ``auto`` layout fields): enumeration, ranking, memory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from pipefit.cli import main as cli_main
from pipefit.config import ConfigError, HardwareConfig, validate
from pipefit.config.compose import compose
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition.balance import StageMemory
from pipefit.partition.checkpointing import CheckpointedMemory, checkpointed
from pipefit.partition.costs import Hardware, Workload, flops_costs
from pipefit.partition.search import (
    resolve_auto,
    search,
    search_run,
    split_global_batch,
)

GIB = 2**30


def _llama(layers: int, hidden: int, inter: int, heads: int, kv: int) -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def _hardware(**values: float) -> Hardware:
    return Hardware.from_config(HardwareConfig(**values))  # type: ignore[arg-type]


def test_checkpointed_memory_by_hand() -> None:
    """Stage 0 of 2 with 4 micro-batches holds 2 in flight: weights + 2 x group inputs + one group recomputed."""
    base = StageMemory(static=[1, 1, 1, 1], activation=[10, 10, 10, 10], micro_batches=4)
    assert base.stage_bytes(0, 2, 0, 4) == 4 + 2 * 40
    two = CheckpointedMemory(
        static=[1, 1, 1, 1], activation=[10, 10, 10, 10], micro_batches=4, interval=2, inputs=[1, 1, 1, 1], kept=[0] * 4
    )
    assert two.stage_bytes(0, 2, 0, 4) == 4 + 2 * 2 + 20  # inputs of layers 0 and 2; groups [0,2) [2,4)
    assert two.stage_bytes(1, 2, 1, 4) == 3 + 1 * 2 + 20  # last stage: 1 in flight; groups [1,3) [3,4)
    one = CheckpointedMemory(
        static=[1, 1, 1, 1], activation=[10, 10, 10, 30], micro_batches=4, interval=1, inputs=[1, 1, 1, 1], kept=[0] * 4
    )
    assert one.stage_bytes(0, 2, 0, 4) == 4 + 2 * 4 + 30  # the largest single layer is recomputed
    kept = CheckpointedMemory(static=[0, 0], activation=[5, 7], micro_batches=4, interval=1, inputs=[1, 1], kept=[0, 7])
    assert kept.stage_bytes(0, 2, 0, 2) == 2 * (2 + 7) + 5  # the kept bytes are not recomputed


def test_checkpointing_recomputes_every_forward() -> None:
    cfg = _llama(4, 256, 512, 4, 2)
    plan = layer_plan(make_skeleton(cfg))
    work = Workload(512, 2, 4, 1, "bf16", 1)
    base = flops_costs(cfg, plan, work, _hardware())
    ck = checkpointed(base, cfg, plan, work, 1)
    assert checkpointed(base, cfg, plan, work, 0) is base
    for i in range(len(plan)):
        assert ck.backward_s[i] == base.forward_s[i] + base.backward_s[i]
        assert ck.per_layer()[i] == pytest.approx(base.per_layer()[i] + 4 * base.forward_s[i], rel=1e-12)
    whole = (0, len(plan))
    assert ck.memory.stage_bytes(0, 1, *whole) < base.memory.stage_bytes(0, 1, *whole)


def test_global_batch_splits() -> None:
    got = split_global_batch(8, 4, [1, 2, 4])
    assert got == [(1, 4, 1, 2), (1, 4, 2, 1), (2, 2, 1, 4), (2, 2, 2, 2), (2, 2, 4, 1)] + [
        (4, 1, m, 8 // m) for m in (1, 2, 4, 8)
    ]
    assert all(m * a * dp == 8 and pp * dp == 4 for pp, dp, m, a in got)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=6 cannot be made .* on 4 ranks"):
        split_global_batch(6, 4, [1])  # one stage: 4 replicas, and 6 is not a multiple of 4
    assert split_global_batch(6, 4, [1, 2]) == [(2, 2, 1, 3), (2, 2, 3, 1)]


def test_ranking_derived_by_hand() -> None:
    """2 ranks, global batch 2, free transfers and optimizer: one replica per rank (pp=1, dp=2) does a
    whole model's work W per step; pp=2 with one micro-batch of 2 runs both stages in turn, 2W; pp=2
    with 2 micro-batches of 1 overlaps them (between 1.5W and 2W with 2 stages). A memory cap between
    half the model and the whole of it rejects pp=1 and leaves pp=2 with micro-batches of 1 first."""
    cfg = _llama(4, 512, 1024, 8, 2)
    plan = layer_plan(make_skeleton(cfg))
    fast = {"memory_bandwidth_gbs": 1e12, "link_bandwidth_gbs": 1e12, "peak_tflops_fp32": 1.0}
    kwargs: dict[str, Any] = {"world": 2, "global_batch": 2, "seq_len": 64, "intervals": [0], "zero_stages": [1]}
    kwargs["schedules"] = ["1f1b"]
    roomy = search(cfg, plan, _hardware(memory_gib=100, **fast), **kwargs)
    by = {(c["pp"], c["micro_batch_size"]): c for c in roomy["candidates"]}
    assert sorted(by) == [(1, 1), (2, 1), (2, 2)]
    w = by[(1, 1)]["predicted_step_s"]
    assert by[(2, 2)]["predicted_step_s"] == pytest.approx(2 * w, rel=1e-6)
    assert 1.5 * w <= by[(2, 1)]["predicted_step_s"] < 2 * w
    assert [(c["pp"], c["micro_batch_size"]) for c in roomy["candidates"]] == [(1, 1), (2, 1), (2, 2)]
    assert roomy["best"] is roomy["candidates"][0]
    assert roomy["best"]["tokens_per_s"] == pytest.approx(2 * 64 / w)

    whole = by[(1, 1)]["peak_memory_bytes"]
    halves = max(by[(2, 1)]["peak_memory_bytes"], by[(2, 2)]["peak_memory_bytes"])
    assert halves < whole
    tight = search(cfg, plan, _hardware(memory_gib=(halves + whole) / 2 / GIB, **fast), **kwargs)
    assert (tight["best"]["pp"], tight["best"]["micro_batch_size"]) == (2, 1)
    rejected = [c for c in tight["candidates"] if not c["fits"]]
    assert [(c["pp"], c["dp"]) for c in rejected] == [(1, 2)] and tight["candidates"][-1] is rejected[0]


def test_llama3_70b_on_64_gpus_counts_and_best() -> None:
    """Every pp dividing 64 (at most the 83 layers), every micro-batch dividing the replica's rows, the
    intervals shorter than a stage; the best is the fastest of the fitting ones."""
    cfg = _llama(80, 8192, 28672, 64, 8)
    plan = layer_plan(make_skeleton(cfg))
    hw = _hardware(
        peak_tflops_fp32=67, peak_tflops_bf16=989, matmul_efficiency=0.45, memory_gib=80,
        memory_bandwidth_gbs=3350, link_bandwidth_gbs=450,
    )  # fmt: skip
    result = search(cfg, plan, hw, world=64, global_batch=512, seq_len=8192, precision="bf16")
    expected = 0
    for pp in (1, 2, 4, 8, 16, 32, 64):
        micros = sum(1 for m in range(1, 512 // (64 // pp) + 1) if (512 // (64 // pp)) % m == 0)
        intervals = 2 + sum(1 for k in (2, 4) if pp == 1 or k < math.ceil(83 / pp))
        expected += micros * intervals * (1 if pp == 1 else 2)  # bf16: ZeRO-1 only; pp >= 2: 1f1b and zb1p
    cands = result["candidates"]
    assert len(cands) == expected == 318
    assert {c["schedule"] for c in cands if c["pp"] == 1} == {"1f1b"}
    assert sum(c["schedule"] == "zb1p" for c in cands) == 318 - 167
    assert all(
        c["pp"] * c["dp"] == 64 and c["micro_batch_size"] * c["grad_accum_steps"] * c["dp"] == 512 for c in cands
    )
    fitting = [c for c in cands if c["fits"]]
    assert fitting and all(c["peak_memory_bytes"] <= 80 * GIB for c in fitting)
    best = result["best"]
    assert best["fits"] and best["tokens_per_s"] == pytest.approx(max(c["tokens_per_s"] for c in fitting), rel=1e-8)
    assert best["tokens_per_s"] == pytest.approx(512 * 8192 / best["predicted_step_s"])
    assert not any(c["fits"] for c in cands if c["pp"] == 1)  # 70B on one GPU with its optimizer: never


def _run(*overrides: str) -> Any:
    return validate(compose(["model=llama_tiny", "hardware=cpu", *overrides]))


def test_resolve_auto_fills_the_layout_and_keeps_explicit_fields() -> None:
    run = _run("pipeline.stages=auto", "train.micro_batch_size=auto", "train.global_batch_size=8")
    resolved, chosen = resolve_auto(run, 2)
    best = search_run(run, 2, intervals=[run.pipeline.activation_checkpoint_interval], zero_stages=[1])["best"]
    assert chosen is not None and chosen["auto"] == ["pipeline.stages", "train.micro_batch_size"]
    p, t = resolved.pipeline, resolved.train
    assert (p.stages, t.micro_batch_size, t.grad_accum_steps, p.boundaries) == (
        best["pp"], best["micro_batch_size"], best["grad_accum_steps"], best["boundaries"],
    )  # fmt: skip
    assert p.partition == "manual" and p.activation_checkpoint_interval == 0
    assert run.pipeline.stages == "auto"  # the caller's config is not changed
    fixed, layout = resolve_auto(
        _run("pipeline.stages=2", "train.micro_batch_size=auto", "train.global_batch_size=8"), 2
    )
    assert fixed.pipeline.stages == 2 and layout is not None and layout["pp"] == 2
    assert resolve_auto(_run(), 2) == (_run(), None)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["pipeline.stages=auto"], r"pipeline\.stages=auto needs train\.global_batch_size"),
        (
            ["pipeline.stages=auto", "train.global_batch_size=8", "pipeline.boundaries=[0,2,7]"],
            r"pipeline\.boundaries=\[0, 2, 7\] cannot be combined with pipeline\.stages=auto",
        ),
        (
            ["train.micro_batch_size=auto", "train.global_batch_size=8", "pipeline.partition=uniform"],
            r"pipeline\.partition=uniform cannot be combined with train\.micro_batch_size=auto",
        ),
        (["pipeline.stages=two"], r"pipeline\.stages='two' is not accepted; expected an integer >= 1 or auto"),
        (["pipeline.stages=auto", "train.global_batch_size=0"], r"train\.global_batch_size=0 is not accepted"),
    ],
)
def test_auto_config_errors_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _run(*overrides)
    assert "\n" not in str(err.value)


def test_auto_errors_for_the_world() -> None:
    three = _run("pipeline.stages=auto", "train.micro_batch_size=auto", "train.global_batch_size=3")
    assert resolve_auto(three, 2)[1]["pp"] == 2  # dp 1 makes 3
    run = _run("pipeline.stages=1", "train.micro_batch_size=auto", "train.global_batch_size=3")
    with pytest.raises(ConfigError, match=r"global_batch_size=3 cannot be made .* on 2 ranks .*a multiple of 2$"):
        resolve_auto(run, 2)  # one stage: 2 replicas, and 3 sequences do not split in two
    tight = _run("pipeline.stages=auto", "train.global_batch_size=4", "hardware.memory_gib=0.001")
    with pytest.raises(ConfigError, match=r"no layout of 2 ranks fits hardware\.memory_gib=0\.001 .* needs 0\.\d+ GiB"):
        resolve_auto(tight, 2)


def test_cli_search_json_and_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["plan", "--search", "--world", "2", "model=llama_tiny", "hardware=cpu", "train.global_batch_size=4"]
    assert cli_main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"pp", "dp", "micro_batch_size", "grad_accum_steps", "activation_checkpoint_interval", "zero_stage"}
    keys |= {"boundaries", "predicted_step_s", "tokens_per_s", "peak_memory_bytes", "fits"}
    assert all(keys <= set(c) for c in out["candidates"])
    # pp 1 (dp 2: micro 1, 2; intervals 0, 1, 2, 4) and pp 2 (dp 1: micro 1, 2, 4; intervals 0, 1, 2: a
    # group of 4 is a whole stage of the 7 layers, each under 1f1b and zb1p), ZeRO 0 and 1
    assert len(out["candidates"]) == (2 * 4 + 3 * 3 * 2) * 2
    assert {c["schedule"] for c in out["candidates"] if c["pp"] == 1} == {"1f1b"}
    assert out["best"] == out["candidates"][0]
    assert cli_main(args) == 0
    table = capsys.readouterr().out
    assert "2 ranks, global batch 4 x 128 tokens" in table and f"{out['best']['boundaries']}" in table
    assert cli_main(["plan", "--search", "--world", "2", "model=llama_tiny"]) == 2
    assert "train.global_batch_size is not set" in capsys.readouterr().err


def test_cli_plan_of_an_auto_run_is_the_searched_layout(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["model=llama_tiny", "hardware=cpu", "train.global_batch_size=8"]
    assert cli_main(["plan", "--search", "--world", "2", "--json", *args, "zero.stage=1"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    best = next(c for c in ranked["candidates"] if (c["zero_stage"], c["activation_checkpoint_interval"]) == (1, 0))
    assert (
        cli_main(["plan", "--world", "2", "--json", *args, "pipeline.stages=auto", "train.micro_batch_size=auto"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["stages"], report["dp"], report["micro_batch_size"]) == (
        best["pp"], best["dp"], best["micro_batch_size"],
    )  # fmt: skip
    assert report["methods"]["manual"]["boundaries"] == best["boundaries"]
    assert report["methods"]["manual"]["predicted_step_s"] == pytest.approx(best["predicted_step_s"], rel=1e-9)
