"""Prices calibrated by a traced run (``pipefit plan --calibrate RUN_DIR``): the ratios, their use, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipefit.cli import main as cli_main
from pipefit.config import validate
from pipefit.config.compose import compose
from pipefit.model.hf import load_hf_config
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition.calibrate import Calibration, apply, fit, measured_layout, read_trace
from pipefit.partition.costs import Hardware, Workload, flops_costs
from pipefit.partition.plan import evaluate
from pipefit.partition.search import search_run

BOUNDS = [0, 3, 7]  # llama_tiny: embed, 4 blocks, norm, head
TINY = ["model=llama_tiny", "hardware=cpu", "pipeline.stages=2", "train.grad_accum_steps=4"]


def _priced(dp: int = 1):
    run = validate(compose(TINY))
    cfg = _config(run)
    plan = layer_plan(make_skeleton(cfg, seed=run.train.seed))
    return plan, flops_costs(cfg, plan, Workload.from_run(run, dp), Hardware.from_config(run.hardware))


def _config(run):
    from pipefit.model.hf import set_attn_implementation

    cfg = load_hf_config(run.model.path, dict(run.model.hf_config))
    set_attn_implementation(cfg, run.model.attn_implementation)
    return cfg


def _stage_prices(costs, bounds):
    m = costs.micro_batches
    reduce = costs.reduce_s or [0.0] * len(costs.forward_s)
    return [
        {
            "forward": m * sum(costs.forward_s[a:b]),
            "backward": m * sum(costs.backward_s[a:b]),
            "optimizer": sum(costs.per_step_s[a:b]) - sum(reduce[a:b]),
            "reduce": sum(reduce[a:b]),
        }
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def test_fit_keeps_measured_over_priced_per_kind_and_apply_reproduces_the_measured_run() -> None:
    plan, costs = _priced(dp=2)
    prices = _stage_prices(costs, BOUNDS)
    assert all(p["reduce"] > 0 for p in prices)  # dp=2: every stage reduces its gradients
    measured = {
        s: {
            "ForwardPass": 1.5 * p["forward"],
            "BackwardPass": 2.0 * p["backward"],
            "OptimizerStep": 3.25 * p["optimizer"],
            "ReduceGrads": 7.0 * p["reduce"],
            "RecvGrad": 9.9,  # waits are not calibrated: the simulator derives them
            "GradNorm": 0.25 * p["optimizer"],  # nested in OptimizerStep: its collective's wait is not the optimizer's
        }
        for s, p in enumerate(prices)
    }
    cal = fit(costs, BOUNDS, measured, source="run")
    assert (cal.forward, cal.backward, cal.optimizer, cal.reduce) == pytest.approx((1.5, 2.0, 3.0, 7.0), rel=1e-12)
    scaled = apply(costs, cal)
    for got, p in zip(_stage_prices(scaled, BOUNDS), prices, strict=True):
        assert got["forward"] == pytest.approx(1.5 * p["forward"], rel=1e-12)
        assert got["backward"] == pytest.approx(2.0 * p["backward"], rel=1e-12)
        assert got["optimizer"] == pytest.approx(3.0 * p["optimizer"], rel=1e-12)
        assert got["reduce"] == pytest.approx(7.0 * p["reduce"], rel=1e-12)
    assert scaled.details["calibration"]["source"] == "run" and scaled.method == "flops+calibrated"
    # Every split's predicted step grows: the compute, optimizer and reduction all cost more.
    for b in (2, 3, 4, 5):
        assert (
            evaluate(scaled, plan, [0, b, 7])["predicted_step_s"]
            > 1.4 * evaluate(costs, plan, [0, b, 7])["predicted_step_s"]
        )


def test_zero_bubble_halves_count_as_backward_and_an_absent_reduction_keeps_its_price() -> None:
    _, costs = _priced(dp=1)
    prices = _stage_prices(costs, BOUNDS)
    assert all(p["reduce"] == 0 for p in prices)  # one replica, no tied weight: nothing to reduce
    measured = {
        s: {"ForwardPass": p["forward"], "BackwardInput": 0.5 * p["backward"], "BackwardWeight": 0.7 * p["backward"]}
        for s, p in enumerate(prices)
    }
    cal = fit(costs, BOUNDS, measured)
    assert cal.backward == pytest.approx(1.2, rel=1e-12) and cal.forward == pytest.approx(1.0, rel=1e-12)
    assert cal.optimizer == 1.0 and cal.reduce == 1.0  # not measured: the model's price stays


@pytest.mark.parametrize(
    ("measured", "message"),
    [
        ({0: {"ForwardPass": 1.0, "BackwardPass": 1.0}}, r"the trace has stages \[0\] but .* \[0, 3, 7\]\) has 2"),
        ({0: {"OptimizerStep": 1.0}, 1: {"OptimizerStep": 1.0}}, "holds no ForwardPass or BackwardPass"),
    ],
)
def test_a_trace_that_is_not_the_layouts_is_one_line(measured: dict, message: str) -> None:
    _, costs = _priced()
    with pytest.raises(ValueError, match=message):
        fit(costs, BOUNDS, measured)


def _run_dir(tmp_path: Path, overrides: list[str], trace: dict | None, bounds: list[int] = BOUNDS, dp: int = 1) -> Path:
    """A run folder as a traced run leaves it: config.yaml, partition.json, metrics.jsonl."""
    out = tmp_path / "traced"
    out.mkdir()
    run = validate(compose(overrides))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))
    (out / "partition.json").write_text(json.dumps({"boundaries": bounds, "data_parallel": dp}))
    lines = [{"step": 1, "loss": 8.0}]
    if trace is not None:
        lines.append({"step": 1, "trace": {f"stage{s}": {"instructions": row} for s, row in trace.items()}})
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def test_read_trace_and_measured_layout_and_their_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--calibrate=.*: no metrics.jsonl there"):
        read_trace(tmp_path)
    with pytest.raises(ValueError, match=r"missing: config.yaml, partition.json"):
        measured_layout(tmp_path)
    out = _run_dir(tmp_path, TINY, None)
    with pytest.raises(ValueError, match=r"metrics.jsonl holds no trace; train that run with train.trace=true"):
        read_trace(out)
    (out / "metrics.jsonl").unlink()
    out.rename(tmp_path / "old")
    out = _run_dir(tmp_path, TINY, {0: {"ForwardPass": 0.25}, 1: {"ForwardPass": 0.5}})
    assert read_trace(out) == {0: {"ForwardPass": 0.25}, 1: {"ForwardPass": 0.5}}
    run, bounds, dp = measured_layout(out, validate(compose(TINY)))
    assert (bounds, dp, run.train.grad_accum_steps) == (BOUNDS, 1, 4)
    other = validate(compose([*TINY, "model.hf_config.num_hidden_layers=6"]))
    with pytest.raises(ValueError, match=r"that run trained model=llama_tiny .* not the planned model=llama_tiny"):
        measured_layout(out, other)


def test_cli_plan_and_search_calibrated_by_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run measured at dp=2 whose gradient reduction took 200x its price: the calibrated plan carries the
    ratios, and the calibrated search stops choosing data parallelism."""
    _, costs = _priced(dp=2)
    prices = _stage_prices(costs, BOUNDS)
    trace = {
        s: {"ForwardPass": 2 * p["forward"], "BackwardPass": 2 * p["backward"], "ReduceGrads": 200 * p["reduce"]}
        for s, p in enumerate(prices)
    }
    out = _run_dir(tmp_path, TINY, trace, dp=2)
    assert cli_main(["plan", *TINY, "--calibrate", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["calibration"]["forward"], report["calibration"]["reduce"]) == pytest.approx((2.0, 200.0))
    assert report["cost_model"] == f"flops, calibrated by {out}"
    plain = _priced(dp=1)[1]
    for row in report["methods"]["uniform"]["stages"]:
        a, b = row["layers"]
        assert row["forward_s"] == pytest.approx(2 * sum(plain.forward_s[a:b]), rel=1e-9)

    run = validate(compose([*TINY, "train.global_batch_size=8"]))
    assert search_run(run, 2)["best"]["dp"] == 2  # priced by the model: dp=2 is fastest
    cal = fit(costs, BOUNDS, trace, source="x")
    assert search_run(run, 2, calibration=cal)["best"]["dp"] == 1  # the measured reduction rules it out
    search = ["plan", "--search", "--world", "2", *TINY, "train.global_batch_size=8"]
    assert cli_main([*search, "--calibrate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"]["dp"] == 1


def test_calibration_defaults_change_nothing() -> None:
    plan, costs = _priced(dp=2)
    same = apply(costs, Calibration())
    assert evaluate(same, plan, BOUNDS)["predicted_step_s"] == evaluate(costs, plan, BOUNDS)["predicted_step_s"]
