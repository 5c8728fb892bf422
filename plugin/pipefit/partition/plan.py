"""``pipefit plan``: the partition, memory per stage and predicted step time, without training.

No process group is started and no layer is built (except, for ``pipeline.partition=profile``,
one layer at a time to time it). Every figure comes from one :class:`pipefit.partition.costs.LayerCosts`:
``flops`` prices the layers unless the run asks for ``profile``, and the same prices rate the
chosen split and the comparison rows (``uniform``, ``parameters``, and the cost-optimal split).

The step time is a simulation of DeepSpeed's 1F1B schedule
(:func:`pipefit.partition.simulate_1f1b.simulate_1f1b`). Each split is also timed under zero-bubble ZB-H1
(:func:`pipefit.partition.zero_bubble_sim.simulate_zb1p`, the backward split into B and the weight-gradient
GEMMs W), so the report compares the two schedules; ``pipeline.schedule`` picks which one the predicted step
and the timeline show. With the CPU contended profile each stage's compute is priced between its price
alone and with every rank busy, by how busy its peers are (:mod:`pipefit.partition.contention`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pipefit.model.hf import load_hf_config, set_attn_implementation
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.model.lora import trainable_layers
from pipefit.partition import balance, contention
from pipefit.partition.boundaries import boundaries_for, price_layers
from pipefit.partition.calibrate import Calibration
from pipefit.partition.calibrate import apply as apply_calibration
from pipefit.partition.checkpointing import checkpointed
from pipefit.partition.costs import Hardware, LayerCosts, Workload, model_flops
from pipefit.partition.simulate_1f1b import Timeline, bubble_fraction, simulate_1f1b
from pipefit.partition.zero_bubble_sim import simulate_zb1p, weight_backward_s

__all__ = [
    "Timeline",
    "bubble_fraction",
    "format_plan",
    "make_plan",
    "price_run",
    "predicted_stage_memory",
    "settled",
    "simulate_1f1b",
    "write_png",
]

COMPARED = ("uniform", "parameters")


def _stage_rows(costs: LayerCosts, plan: Sequence[Any], bounds: Sequence[int]) -> list[dict[str, Any]]:
    p = len(bounds) - 1
    per_layer = costs.per_layer()
    stage_cost = balance.stage_costs(per_layer, bounds, costs.boundary_costs())
    total = sum(stage_cost)
    rows = []
    for s in range(p):
        a, b = bounds[s], bounds[s + 1]
        masks = dict(m for m in costs.attention_masks[a:b] if m is not None)  # one per kind and micro-batch
        mask_bytes = costs.memory.in_flight(s, p) * sum(masks.values())
        rows.append(
            {
                "stage": s,
                "layers": [a, b],
                "num_layers": b - a,
                "kinds": [plan[i].kind for i in range(a, b)],
                "params": sum(plan[i].num_params for i in range(a, b)),
                "cost_s": stage_cost[s],
                "share": stage_cost[s] / total if total else 0.0,
                "forward_s": sum(costs.forward_s[a:b]),
                "backward_s": sum(costs.backward_s[a:b]),
                "per_step_s": sum(costs.per_step_s[a:b]),
                "memory_bytes": costs.memory.stage_bytes(s, p, a, b) + mask_bytes,
                "mask_bytes": mask_bytes,
                "in_flight_micro_batches": costs.memory.in_flight(s, p),
            }
        )
    return rows


def predicted_stage_memory(
    skeleton: Any, workload: Workload, bounds: Sequence[int], hardware: Any = None
) -> list[float]:
    """Each stage's predicted peak bytes for the split ``bounds`` (the memory ``pipefit plan`` reports)."""
    plan = layer_plan(skeleton)
    hw = Hardware.from_config(hardware) if hardware is not None else Hardware()
    costs = price_layers(skeleton, "flops", workload, hw)
    return [r["memory_bytes"] for r in _stage_rows(costs, plan, bounds)]


def evaluate(
    costs: LayerCosts,
    plan: Sequence[Any],
    bounds: Sequence[int],
    schedule: str = "1f1b",
    weight_s: Sequence[float] | None = None,
    schedules: Sequence[str] = ("1f1b", "zb1p"),
) -> dict[str, Any]:
    """Every figure ``plan`` reports for one split, its step under ``schedule`` (and each of ``schedules``).

    ``weight_s``: per layer, the W seconds of its backward (default: from ``costs.flops``, else none);
    zb1p is timed only with 2 stages or more.
    """
    rows = _stage_rows(costs, plan, bounds)
    p = len(rows)
    if weight_s is None:
        weight_s = [0.0] * len(plan)
        if costs.flops:
            weight_s = weight_backward_s(costs.forward_s, costs.backward_s, costs.flops, plan)
    for r in rows:
        r["weight_s"] = sum(weight_s[r["layers"][0] : r["layers"][1]])
    stage_cost = [r["cost_s"] for r in rows]
    tied_stages = sorted({s for s, r in enumerate(rows) for i in range(*r["layers"]) if plan[i].tied})
    per_step, w_both = [r["per_step_s"] for r in rows], [r["weight_s"] for r in rows]
    timed = (schedule == "zb1p" or "zb1p" in schedules) and p >= 2

    def simulate(forward: list[float], backward: list[float], w: list[float], zb: bool = timed) -> dict[str, Timeline]:
        transfer = costs.transfer_s if p > 1 else 0.0
        if costs.transfer_busy:  # each forward receives (but on stage 0) and sends on (but on the last stage)
            sides = [(s > 0) + (s < p - 1) for s in range(p)]
            forward = [f + k * transfer for f, k in zip(forward, sides, strict=True)]
            backward = [b + k * transfer for b, k in zip(backward, sides, strict=True)]
            transfer = 0.0
        found = {"1f1b": simulate_1f1b(forward, backward, costs.micro_batches, transfer, per_step, tied_stages)}
        if zb:
            b_in = [b - x for b, x in zip(backward, w, strict=True)]
            found["zb1p"] = Timeline(
                *simulate_zb1p(forward, b_in, w, costs.micro_batches, transfer, per_step, tied_stages)
            )
        return found

    forward, backward, w = [r["forward_s"] for r in rows], [r["backward_s"] for r in rows], w_both
    if costs.alone_forward_s and p > 1:  # CPU: priced between alone and contended by the peers' busy share
        both_b = backward

        def w_at(b: list[float]) -> list[float]:  # W keeps its share of the backward
            return [x * y / z if z else x for x, y, z in zip(w_both, b, both_b, strict=True)]

        alone = [
            [sum(x[a:b]) for a, b in (r["layers"] for r in rows)]
            for x in (costs.alone_forward_s, costs.alone_backward_s)
        ]
        shown = schedule if schedule == "zb1p" and timed else "1f1b"  # each round simulates only this one
        forward, backward, busy = contention.settle(
            lambda f, b: simulate(f, b, w_at(b), zb=shown == "zb1p")[shown], (forward, backward), (alone[0], alone[1])
        )
        w = w_at(backward)
        for r, x in zip(rows, busy, strict=True):
            r["peer_busy"] = x  # the share of the step its peers compute: its weight on the contended price
    for r, f, b in zip(rows, forward, backward, strict=True):
        r["settled_forward_s"], r["settled_backward_s"] = f, b  # what the stage computes at (contention)
    timelines = simulate(forward, backward, w)
    by_schedule = {name: t.step_s for name, t in timelines.items()}
    timeline = timelines.get(schedule, timelines["1f1b"])
    mean = sum(stage_cost) / p
    return {
        "boundaries": list(bounds),
        "stages": rows,
        "bottleneck_s": max(stage_cost),
        "bottleneck_over_mean": max(stage_cost) / mean if mean else 1.0,
        "peak_memory_bytes": max(r["memory_bytes"] for r in rows),
        "fits_memory": max(r["memory_bytes"] for r in rows) <= costs.memory_cap,
        "schedule": schedule if schedule in by_schedule else "1f1b",
        "predicted_step_s": timeline.step_s,
        "predicted_step_by_schedule": by_schedule,
        "timeline": [list(op) for op in timeline.ops],
    }


def settled(costs: LayerCosts, plan: Sequence[Any], bounds: Sequence[int]) -> tuple[LayerCosts, list[list[float]]]:
    """``costs`` as they run at split ``bounds``, and per layer the part of its forward and backward price
    paid at the alone rate. With alone prices (:mod:`.contention`) each layer's forward and backward is
    ``alone x (1 - u) + contended x u`` at its stage's peer-busy share ``u``, and no alone prices are left;
    without, ``costs`` and zeros. :func:`pipefit.partition.calibrate.fit` calibrates only the rest."""
    if not costs.alone_forward_s:
        return costs, [[0.0] * len(plan), [0.0] * len(plan)]
    stage = {i: r for r in evaluate(costs, plan, bounds)["stages"] for i in range(*r["layers"])}
    u = [stage[i].get("peer_busy", 1.0) for i in range(len(plan))]
    alone = [
        [a * (1 - x) for a, x in zip(costs.alone_forward_s, u, strict=True)],
        [a * (1 - x) for a, x in zip(costs.alone_backward_s, u, strict=True)],
    ]
    forward = [a + c * x for a, c, x in zip(alone[0], costs.forward_s, u, strict=True)]
    backward = [a + c * x for a, c, x in zip(alone[1], costs.backward_s, u, strict=True)]
    return replace(costs, forward_s=forward, backward_s=backward, alone_forward_s=[], alone_backward_s=[]), alone


def price_run(
    run: Any,
    dp: int = 1,
    device: str = "cpu",
    cache_dir: str | None = None,
    costs_model: str | None = None,
    contended: bool = False,
) -> tuple[Any, LayerCosts, str]:
    """``(skeleton, prices, cost model name)`` of a validated run's layers, as :func:`make_plan` prices them
    (with ``pipeline.activation_checkpoint_interval``'s recompute and memory, :mod:`.checkpointing`)."""
    hf_config = load_hf_config(run.model.path, dict(run.model.hf_config))
    set_attn_implementation(hf_config, run.model.attn_implementation)
    skeleton = make_skeleton(hf_config, seed=run.train.seed)
    p = run.pipeline
    workload = Workload.from_run(run, dp)
    model_name = costs_model or ("profile" if p.partition == "profile" else "flops")
    ranks = p.stages * dp if contended and model_name == "profile" and device == "cpu" else 1
    hw = Hardware.from_config(run.hardware)
    costs = price_layers(skeleton, model_name, workload, hw, device=device, cache_dir=cache_dir, ranks=ranks)
    interval = p.activation_checkpoint_interval
    if isinstance(interval, int) and interval > 0:  # recompute in the backward; less memory kept
        costs = checkpointed(costs, hf_config, layer_plan(skeleton), workload, interval)
    return skeleton, costs, model_name


def make_plan(
    run: Any,
    dp: int = 1,
    device: str = "cpu",
    cache_dir: str | None = None,
    costs_model: str | None = None,
    contended: bool = False,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """The plan for a validated :class:`pipefit.config.RunConfig` on ``run.hardware``.

    ``costs_model`` (``flops`` or ``profile``) prices every split, the chosen one included (e.g. a manual
    one); by default ``profile`` when ``pipeline.partition=profile``, else ``flops``. ``contended``:
    ``profile`` on CPU measures with one process per rank busy at once (:mod:`pipefit.partition.contended`).
    ``calibration``: every price times the ratios a traced run measured (:mod:`pipefit.partition.calibrate`).
    """

    skeleton, costs, model_name = price_run(run, dp, device, cache_dir, costs_model, contended)
    if calibration is not None:
        costs = apply_calibration(costs, calibration)
    hf_config, plan, p = skeleton.config, layer_plan(skeleton), run.pipeline
    workload = Workload.from_run(run, dp)
    chosen = boundaries_for(skeleton, p.partition, p.stages, p.boundaries, layer_costs=costs)
    found = trainable_layers(run, skeleton)
    flops = costs.flops or model_flops(hf_config, plan, workload.seq_len, workload.micro_batch_size)
    weights = weight_backward_s(costs.forward_s, costs.backward_s, flops, plan, found[0] if found else None)
    compared = ("1f1b",) if workload.precision == "fp16" else ("1f1b", "zb1p")
    methods: dict[str, dict[str, Any]] = {}
    for name in (p.partition, *COMPARED, model_name):
        if name not in methods:
            bounds = (
                chosen if name == p.partition else boundaries_for(skeleton, name, p.stages, None, layer_costs=costs)
            )
            methods[name] = evaluate(costs, plan, bounds, p.schedule, weights, compared)
    return {
        "model": run.model.name,
        "num_layers": len(plan),
        "stages": p.stages,
        "dp": dp,
        "micro_batches": workload.micro_batches,
        "micro_batch_size": workload.micro_batch_size,
        "seq_len": workload.seq_len,
        "precision": workload.precision,
        "hardware": run.hardware.name,
        "cost_model": model_name if calibration is None else f"{model_name}, calibrated by {calibration.source}",
        "calibration": None if calibration is None else costs.details["calibration"],
        "attention": hf_config._attn_implementation,
        "layout": run.data.layout,
        "chosen": p.partition,
        "schedule": p.schedule,
        "bubble_fraction": bubble_fraction(p.stages, workload.micro_batches),
        "memory_cap_bytes": costs.memory_cap,
        "transfer_s": costs.transfer_s,
        "layers": [
            {
                "index": layer.index,
                "kind": layer.kind,
                "params": layer.num_params,
                "cost_s": c,
                "forward_s": costs.forward_s[layer.index],
                "backward_s": costs.backward_s[layer.index],
                "per_step_s": costs.per_step_s[layer.index],
                "flops": costs.flops[layer.index].total if costs.flops else None,
                "activation_bytes": costs.memory.activation[layer.index],
            }
            for layer, c in zip(plan, costs.per_layer(), strict=True)
        ],
        "methods": methods,
    }


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def _seconds(x: float) -> str:
    return f"{x * 1e3:.3f} ms" if x < 1 else f"{x:.3f} s"


def _layer_span(a: int, b: int, kinds: list[str]) -> str:
    names = {"embed": "emb", "norm": "norm", "head": "head", "transform": "xform", "pooler": "pool"}
    parts: list[str] = []
    blocks = sum(1 for k in kinds if k == "block")
    for k in kinds:
        if k == "block":
            if blocks:
                parts.append(f"{blocks} blk")
                blocks = 0
        else:
            parts.append(names[k])
    return f"{a}-{b - 1} ({'+'.join(parts)})"


def format_plan(report: dict[str, Any]) -> str:
    """The human-readable plan: one row per stage of the chosen split, then the comparison."""
    chosen = report["methods"][report["chosen"]]
    lines = [
        f"pipefit plan: {report['model']}, {report['num_layers']} layers, pp={report['stages']} x dp={report['dp']}, "
        f"{report['micro_batches']} micro-batches of {report['micro_batch_size']} x {report['seq_len']} tokens, "
        f"{report['precision']}, hardware={report['hardware']}, costs priced by {report['cost_model']}",
        f"partition={report['chosen']}: boundaries {chosen['boundaries']}",
        f"{'stage':>5}  {'layers':<24} {'params':>14} {'cost/step':>12} {'share':>6} {'memory GiB':>10} "
        f"{'in flight':>9}",
    ]
    for r in chosen["stages"]:
        lines.append(
            f"{r['stage']:>5}  {_layer_span(*r['layers'], r['kinds']):<24} {r['params']:>14,} "
            f"{_seconds(r['cost_s']):>12} {r['share']:>6.1%} {_gib(r['memory_bytes']):>10} "
            f"{r['in_flight_micro_batches']:>9}"
        )
    cap = report["memory_cap_bytes"]
    if any(r["mask_bytes"] for r in chosen["stages"]):
        per_stage = ", ".join(_gib(r["mask_bytes"]) for r in chosen["stages"])
        lines.append(
            f"memory includes dense [b,1,s,s] attention masks ({report['attention']}, data.layout={report['layout']}), "
            f"one per micro-batch in flight: {per_stage} GiB by stage"
        )
    lines += [
        f"bottleneck/mean {chosen['bottleneck_over_mean']:.3f}   "
        f"bubble (p-1)/(m+p-1) {report['bubble_fraction']:.3f}   "
        f"predicted step {_seconds(chosen['predicted_step_s'])}   "
        f"peak stage memory {_gib(chosen['peak_memory_bytes'])}"
        f" of {_gib(cap)} GiB{'' if chosen['fits_memory'] else '  (DOES NOT FIT)'}",
        _schedule_line(chosen),
        "",
        f"{'method':<12} {'boundaries':<28} {'bottleneck/mean':>15} {'predicted step':>15} {'vs chosen':>9} "
        f"{'peak GiB':>9}",
    ]
    for name, m in report["methods"].items():
        lines.append(
            f"{name:<12} {str(m['boundaries']):<28} {m['bottleneck_over_mean']:>15.3f} "
            f"{_seconds(m['predicted_step_s']):>15} {m['predicted_step_s'] / chosen['predicted_step_s']:>8.3f}x "
            f"{_gib(m['peak_memory_bytes']):>9}{'' if m['fits_memory'] else '  does not fit'}"
        )
    return "\n".join(lines)


def _schedule_line(m: dict[str, Any]) -> str:
    steps = m["predicted_step_by_schedule"]
    ref = steps[m["schedule"]]
    parts = [
        f"{name}{' (pipeline.schedule)' if name == m['schedule'] else ''} {_seconds(s)} {s / ref:.3f}x"
        for name, s in steps.items()
    ]
    return "predicted step by schedule: " + ", ".join(parts)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1)


def write_png(report: dict[str, Any], path: str) -> None:
    """Per-stage cost bars of every method, and the chosen split's timeline (F, B and, for zb1p, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    chosen = methods[report["chosen"]]
    p = report["stages"]
    fig, (bars, line) = plt.subplots(2, 1, figsize=(11, 3.2 + 0.5 * p + 2.5), gridspec_kw={"height_ratios": [1, 1]})
    width = 0.8 / len(methods)
    for k, (name, m) in enumerate(methods.items()):
        xs = [s + k * width for s in range(p)]
        ratio = m["bottleneck_over_mean"]
        bars.bar(xs, [r["cost_s"] for r in m["stages"]], width, label=f"{name} {m['boundaries']} max/mean {ratio:.2f}")
    bars.set_xticks([s + 0.4 - width / 2 for s in range(p)], [f"stage {s}" for s in range(p)])
    bars.set_ylabel("seconds per step")
    bars.set_title(f"{report['model']}: stage cost by partition method ({report['cost_model']} prices)")
    top = max(r["cost_s"] for m in methods.values() for r in m["stages"])
    bars.set_ylim(0, top * 1.3)
    bars.legend(fontsize=8, loc="upper center", ncol=len(methods))
    colors = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green", "step": "tab:gray"}
    for stage, kind, micro, start, end in chosen["timeline"]:
        line.broken_barh([(start, end - start)], (p - 1 - stage - 0.4, 0.8), facecolors=colors[kind], edgecolor="white")
        if kind != "step" and (end - start) > chosen["predicted_step_s"] / 60:
            line.text((start + end) / 2, p - 1 - stage, f"{kind}{micro}", ha="center", va="center", fontsize=7)
    line.set_yticks(range(p), [f"stage {p - 1 - s}" for s in range(p)])
    line.set_xlabel("seconds (white gaps: pipeline bubbles)")
    line.set_title(
        f"{chosen['schedule']}, partition={report['chosen']} {chosen['boundaries']}: predicted step "
        f"{chosen['predicted_step_s']:.4g} s, bubble (p-1)/(m+p-1) = {report['bubble_fraction']:.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
