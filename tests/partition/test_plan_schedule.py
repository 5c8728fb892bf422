"""pipefit plan and --search under pipeline.schedule: zb1p's step on hand-computed cases, W per layer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipefit.cli import compose, main
from pipefit.config import validate
from pipefit.model.hf import load_hf_config
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition.balance import StageMemory
from pipefit.partition.costs import Hardware, LayerCosts, Workload, flops_costs
from pipefit.partition.plan import evaluate, format_plan, make_plan
from pipefit.partition.search import resolve_auto, search_run
from pipefit.partition.zero_bubble_sim import weight_backward_s


def _two_blocks(m: int) -> tuple[LayerCosts, list[SimpleNamespace]]:
    """One block per stage, F = 1, whole backward 2 (B = W = 1 once split), no transfers or optimizer."""
    costs = LayerCosts(
        method="flops",
        forward_s=[1.0, 1.0],
        backward_s=[2.0, 2.0],
        per_step_s=[0.0, 0.0],
        transfer_s=0.0,
        micro_batches=m,
        memory=StageMemory(static=[0, 0], activation=[0, 0], micro_batches=m),
        memory_cap=1.0,
    )
    plan = [SimpleNamespace(kind="block", tied=False, num_params=1) for _ in range(2)]
    return costs, plan


@pytest.mark.parametrize("m", [2, 4, 8])  # ZB-H1's formula holds for m >= p
def test_zb1p_step_by_hand(m: int) -> None:
    costs, plan = _two_blocks(m)
    p, f, b, w = 2, 1.0, 1.0, 1.0
    zb = evaluate(costs, plan, [0, 1, 2], "zb1p", [w, w])
    assert zb["predicted_step_s"] == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))
    assert zb["predicted_step_by_schedule"]["1f1b"] == pytest.approx((m + p - 1) * (f + b + w))
    assert zb["schedule"] == "zb1p" and [r["weight_s"] for r in zb["stages"]] == [w, w]
    assert sum(op[1] == "W" for op in zb["timeline"]) == p * m
    one = evaluate(costs, plan, [0, 1, 2], "1f1b", [w, w])
    assert one["predicted_step_s"] == pytest.approx((m + p - 1) * (f + b + w))
    assert one["predicted_step_by_schedule"]["zb1p"] == zb["predicted_step_s"]
    assert not any(op[1] == "W" for op in one["timeline"])
    # Without W (a frozen model's blocks) zb1p is 1F1B's order and time.
    assert evaluate(costs, plan, [0, 1, 2], "zb1p", [0.0, 0.0])["predicted_step_s"] == pytest.approx((m + 1) * 3)


def test_weight_backward_is_the_weight_gemm_share() -> None:
    run = validate(compose(["model=llama_tiny", "hardware=cpu"]))
    skeleton = make_skeleton(load_hf_config(run.model.path, dict(run.model.hf_config)))
    plan = layer_plan(skeleton)
    hw = Hardware.from_config(run.hardware)
    costs = flops_costs(skeleton.config, plan, Workload(128, 4), hw)
    w = weight_backward_s(costs.forward_s, costs.backward_s, costs.flops, plan)
    rate = hw.achieved_flops("fp32")
    for i, layer in enumerate(plan):
        if layer.kind == "block":
            assert w[i] == pytest.approx(costs.flops[i].matmul / rate, rel=1e-12)
            assert 0 < w[i] < costs.backward_s[i] / 2  # attention and elementwise backward stay in B
        elif layer.kind in ("embed", "norm") or layer.tied:
            assert w[i] == 0.0
    trainable = [layer.kind != "block" for layer in plan]  # the blocks frozen
    only_blocks = weight_backward_s(costs.forward_s, costs.backward_s, costs.flops, plan, trainable)
    assert [x for x, t in zip(only_blocks, trainable, strict=True) if not t] == [0.0] * trainable.count(False)


def test_plan_reports_both_schedules_and_draws_w(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pipeline.partition=flops", "pipeline.stages=2"]
    zb = make_plan(validate(compose([*args, "pipeline.schedule=zb1p"])))
    one = make_plan(validate(compose(args)))
    z, o = zb["methods"]["flops"], one["methods"]["flops"]
    assert z["predicted_step_by_schedule"] == pytest.approx(o["predicted_step_by_schedule"])
    assert z["predicted_step_s"] == z["predicted_step_by_schedule"]["zb1p"] < o["predicted_step_s"]
    assert o["predicted_step_s"] == o["predicted_step_by_schedule"]["1f1b"]
    assert "predicted step by schedule: 1f1b" in format_plan(zb) and "zb1p (pipeline.schedule)" in format_plan(zb)
    png = tmp_path / "zb.png"
    assert main(["plan", *args, "pipeline.schedule=zb1p", "--json", "--png", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {op[1] for op in report["methods"]["flops"]["timeline"]} == {"F", "B", "W", "step"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_lists_both_schedules_and_auto_keeps_the_runs() -> None:
    run = validate(compose(["model=llama_tiny", "hardware=cpu", "train.global_batch_size=4"]))
    result = search_run(run, 2, intervals=[0], zero_stages=[1])
    cands = result["candidates"]
    pairs = {}
    for c in cands:
        pairs.setdefault((c["pp"], c["micro_batch_size"]), {})[c["schedule"]] = c["predicted_step_s"]
    assert pairs[(1, 1)].keys() == {"1f1b"} and pairs[(2, 1)].keys() == {"1f1b", "zb1p"}
    assert all(v["zb1p"] < v["1f1b"] for k, v in pairs.items() if k[0] == 2)
    assert result["best"]["tokens_per_s"] == max(c["tokens_per_s"] for c in cands if c["fits"])
    auto = ["pipeline.stages=auto", "pipeline.schedule=zb1p", "train.micro_batch_size=auto"]
    resolved, chosen = resolve_auto(
        validate(compose(["model=llama_tiny", "hardware=cpu", "train.global_batch_size=4", *auto])), 2
    )
    assert chosen["schedule"] == "zb1p" and resolved.pipeline.schedule == "zb1p" and chosen["pp"] == 2
