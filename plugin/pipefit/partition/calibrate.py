"""Prices calibrated by a measured run: what the engine really spends, learned from ``train.trace``.

A cost model prices layers in isolation (``flops``: analytic; ``profile``: each layer timed alone or with
every rank busy). A step of the real engine adds what those prices miss: DeepSpeed's work around each
instruction (buffers, hooks, the loss), the caches a stage's layers share, the optimizer as ZeRO-1 runs it
and the data-parallel reduction as gloo or NCCL really moves it. A traced run (``train.trace=true``) measures
every instruction on every stage; :func:`fit` compares those seconds with the prices of the same layout and
keeps one ratio per kind of work (:class:`Calibration`), and :func:`apply` multiplies any layout's prices by
them, so ``pipefit plan --calibrate RUN_DIR`` predicts other splits, micro-batches and replicas from one
short measured run.

- ``forward``: ``ForwardPass`` seconds over the priced forwards (m per stage);
- ``backward``: ``BackwardPass`` (or zb1p's ``BackwardInput`` + ``BackwardWeight``) over the priced backwards;
  with the CPU contended profile, whose stages are priced between their price alone and with every rank
  busy (:mod:`pipefit.partition.contention`), only the busy part is calibrated: the ratio is the measured
  seconds less the part priced alone, over the part priced busy. A layer timed with its peers idle costs
  what the engine measures on a stage whose peer idles (within 3 % here), while the cost of both ranks
  computing at once is what a shared machine changes from one minute to the next, and what a trace of a
  balanced split measures. Where less than a quarter of a kind's price was busy, the trace says too little
  about it and the one ratio applies to both parts (``alone_forward``, ``alone_backward``);
- ``optimizer``: ``OptimizerStep`` less the gradient norm inside it (``GradNorm``/``GradNormClip``: a
  collective across stages, where the stage that finished first waits for the others) over the priced
  optimizer work;
- ``reduce``: ``ReduceGrads`` + ``ReduceTiedGrads`` over the priced gradient communication; 1 when the
  measured run had none (one replica, no tied weight across stages), so that term keeps its model price.

Waits (receives, the bubble) are not calibrated: the 1F1B simulator derives them from the calibrated
prices.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipefit.config import validate
from pipefit.partition.costs import LayerCosts

__all__ = ["Calibration", "apply", "fit", "measured_layout", "read_trace"]

KIND_OF = {
    "ForwardPass": "forward",
    "BackwardPass": "backward",
    "BackwardInput": "backward",
    "BackwardWeight": "backward",
    "OptimizerStep": "optimizer",
    "ReduceGrads": "reduce",
    "ReduceTiedGrads": "reduce",
}
KINDS = ("forward", "backward", "optimizer", "reduce")
MIN_BUSY_SHARE = 0.25  # of a kind's price: below it, one ratio for the busy and the alone part
# Spans nested in OptimizerStep that hold a cross-stage collective (pipefit.run.engine's norm overrides).
WAITS_IN_OPTIMIZER = ("GradNorm", "GradNormClip")


@dataclass(frozen=True)
class Calibration:
    """Measured over priced seconds per kind of work (see the module docstring), and where they come from."""

    forward: float = 1.0
    backward: float = 1.0
    optimizer: float = 1.0
    reduce: float = 1.0
    source: str = ""
    alone_forward: float = 1.0  # the ratio of prices with the peers idle (see the module docstring)
    alone_backward: float = 1.0


def _priced(costs: LayerCosts, bounds: Sequence[int]) -> list[dict[str, float]]:
    """Per stage of ``bounds``: the seconds per step each kind is priced at."""
    reduce = costs.reduce_s or [0.0] * len(costs.forward_s)
    m = costs.micro_batches
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        red = sum(reduce[a:b])
        out.append(
            {
                "forward": m * sum(costs.forward_s[a:b]),
                "backward": m * sum(costs.backward_s[a:b]),
                "optimizer": sum(costs.per_step_s[a:b]) - red,
                "reduce": red,
            }
        )
    return out


def fit(
    costs: LayerCosts,
    bounds: Sequence[int],
    measured: Mapping[int, Mapping[str, float]],
    source: str = "",
    alone: Sequence[Sequence[float]] | None = None,
) -> Calibration:
    """The ratios of a measured run: ``measured`` per stage, seconds per step of each instruction (the
    ``instructions`` of ``train.trace``'s breakdown), ``costs`` the prices of that run's own layout, and
    ``alone`` per layer the part of its forward and backward price paid at the rate with the peers idle (both
    from :func:`pipefit.partition.plan.settled`; none: all of it busy).

    Raises:
        ValueError: the trace's stages are not the layout's, or it holds no forward or backward.
    """
    priced = _priced(costs, bounds)
    if sorted(measured) != list(range(len(priced))):
        raise ValueError(
            f"--calibrate: the trace has stages {sorted(measured)} but the measured run's layout "
            f"(boundaries {list(bounds)}) has {len(priced)}"
        )
    spent = dict.fromkeys(KINDS, 0.0)
    for row in measured.values():
        for name, seconds in row.items():
            if name in KIND_OF:
                spent[KIND_OF[name]] += seconds
        spent["optimizer"] -= sum(row.get(name, 0.0) for name in WAITS_IN_OPTIMIZER)
    prices = {k: sum(stage[k] for stage in priced) for k in KINDS}
    if not (spent["forward"] > 0 and spent["backward"] > 0):
        raise ValueError(f"--calibrate: the trace of {source or 'the run'} holds no ForwardPass or BackwardPass")
    ratios = {k: spent[k] / prices[k] if prices[k] > 0 and spent[k] > 0 else 1.0 for k in KINDS}
    fixed = dict(zip(("forward", "backward"), alone or ([], []), strict=True))
    for kind in ("forward", "backward"):  # only the busy part, where the trace measured enough of it
        ratios[f"alone_{kind}"] = ratios[kind]
        held = costs.micro_batches * sum(sum(fixed[kind][a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        if held > 0 and prices[kind] - held >= MIN_BUSY_SHARE * prices[kind] and spent[kind] > held:
            ratios[kind] = (spent[kind] - held) / (prices[kind] - held)
            ratios[f"alone_{kind}"] = 1.0
    return Calibration(**ratios, source=source)


def apply(costs: LayerCosts, cal: Calibration) -> LayerCosts:
    """``costs`` with every price multiplied by its measured ratio."""
    reduce = costs.reduce_s or [0.0] * len(costs.forward_s)
    per_step = [(w - r) * cal.optimizer + r * cal.reduce for w, r in zip(costs.per_step_s, reduce, strict=True)]
    return dataclasses.replace(
        costs,
        method=f"{costs.method}+calibrated",
        forward_s=[f * cal.forward for f in costs.forward_s],
        backward_s=[b * cal.backward for b in costs.backward_s],
        alone_forward_s=[f * cal.alone_forward for f in costs.alone_forward_s],
        alone_backward_s=[b * cal.alone_backward for b in costs.alone_backward_s],
        per_step_s=per_step,
        reduce_s=[r * cal.reduce for r in reduce],
        details={**costs.details, "calibration": dataclasses.asdict(cal)},
    )


def read_trace(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """Per stage, seconds per step of each instruction: the last ``trace`` line of ``RUN_DIR/metrics.jsonl``.

    Raises:
        ValueError: no metrics.jsonl, or none of its lines holds a trace (the run was not traced).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"--calibrate={run_dir}: no metrics.jsonl there; expected the output_dir of a run")
    found: dict[str, Any] | None = None
    for line in path.read_text().splitlines():
        if '"trace"' in line:
            found = json.loads(line)["trace"]
    if found is None:
        raise ValueError(
            f"--calibrate={run_dir}: metrics.jsonl holds no trace; train that run with train.trace=true "
            "(a few steps are enough, e.g. train.max_steps=4 train.trace_steps=[2,4])"
        )
    return {int(stage.removeprefix("stage")): row["instructions"] for stage, row in found.items()}


def measured_layout(run_dir: str | Path, planned: Any = None) -> tuple[Any, list[int], int]:
    """``(run config, boundaries, data-parallel size)`` of the run in ``run_dir`` (its ``config.yaml`` and
    ``partition.json``). ``planned``: the run being planned, whose model the measured one must train.

    Raises:
        ValueError: the folder holds no finished run's records, or the run trained another model.
    """
    from omegaconf import OmegaConf

    folder = Path(run_dir)
    config, partition = folder / "config.yaml", folder / "partition.json"
    if not (config.is_file() and partition.is_file()):
        raise ValueError(
            f"--calibrate={run_dir}: expected a run's output_dir with config.yaml and partition.json "
            f"(missing: {', '.join(f.name for f in (config, partition) if not f.is_file())})"
        )
    run = validate(OmegaConf.load(config))
    record = json.loads(partition.read_text())
    if planned is not None and (run.model.name, run.model.hf_config) != (planned.model.name, planned.model.hf_config):
        raise ValueError(
            f"--calibrate={run_dir}: that run trained model={run.model.name} {dict(run.model.hf_config)}, "
            f"not the planned model={planned.model.name} {dict(planned.model.hf_config)}; calibrate with a run "
            "of the same model"
        )
    return run, list(record["boundaries"]), int(record["data_parallel"])
