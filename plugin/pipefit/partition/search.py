"""The layout search: every (stages, replicas, micro-batch, checkpointing, ZeRO) for a world, ranked.

For ``world`` ranks and ``train.global_batch_size`` sequences, a layout is ``pp`` stages dividing the
world (``dp = world / pp`` replicas), a micro-batch size and accumulation with
``micro x accum x dp = global batch``, an activation checkpoint interval and a ZeRO stage. Each is
split with the exact min-max partitioner under the hardware's memory cap
(:func:`pipefit.partition.balance.partition_min_max`), simulated under 1F1B and, with 2 stages or
more and not fp16 (what ``pipeline.schedule=zb1p`` accepts), under ZB-H1
(:func:`pipefit.partition.plan.evaluate`): one candidate per schedule, ranked by predicted
tokens/s among those that fit.

Prices come from the ``flops`` model only, so the answer is a pure function of the config and the
world size: every rank of a launch computes the same layout and none needs to broadcast it.
:func:`pipefit.partition.costs.flops_costs` runs once per (micro-batch size, dp, ZeRO stage); the
checkpoint intervals and the accumulation reuse those prices.

Activation checkpointing is priced by :mod:`pipefit.partition.checkpointing`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from pipefit.config import AUTO, ConfigError, auto_fields
from pipefit.model.hf import load_hf_config, set_attn_implementation
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition.balance import PartitionError, partition_min_max
from pipefit.partition.boundaries import price_layers
from pipefit.partition.calibrate import Calibration
from pipefit.partition.calibrate import apply as apply_calibration
from pipefit.partition.checkpointing import checkpointed
from pipefit.partition.costs import Hardware, LayerCosts, Workload, flops_costs
from pipefit.partition.plan import evaluate
from pipefit.partition.zero_bubble_sim import weight_backward_s

__all__ = [
    "CHECKPOINT_INTERVALS",
    "format_search",
    "resolve_auto",
    "search",
    "search_run",
    "split_global_batch",
]

CHECKPOINT_INTERVALS = (0, 1, 2, 4)
SCHEDULES = ("1f1b", "zb1p")
GIB = 2**30


def with_micro_batches(costs: LayerCosts, micro_batches: int) -> LayerCosts:
    """The same per-micro-batch prices for a step of ``micro_batches`` micro-batches."""
    memory = dataclasses.replace(costs.memory, micro_batches=micro_batches)
    return dataclasses.replace(costs, micro_batches=micro_batches, memory=memory)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_global_batch(
    global_batch: int, world: int, stages: Sequence[int], micro_batch_sizes: Sequence[int] | None = None
) -> list[tuple[int, int, int, int]]:
    """Every ``(pp, dp, micro_batch_size, grad_accum_steps)`` with ``micro x accum x dp = global_batch``.

    Raises:
        ConfigError: no such layout (the message names the world, the batch and what would work).
    """
    out = []
    for pp in stages:
        if world % pp:
            continue
        dp = world // pp
        if global_batch % dp:
            continue
        rows = global_batch // dp
        for micro in divisors(rows):
            if micro_batch_sizes is None or micro in micro_batch_sizes:
                out.append((pp, dp, micro, rows // micro))
    if not out:
        dps = sorted({world // pp for pp in stages if world % pp == 0}) or [world]
        fixed = list(micro_batch_sizes)[0] if micro_batch_sizes else None
        multiples = sorted({dp * (fixed or 1) for dp in dps})
        raise ConfigError(
            f"train.global_batch_size={global_batch} cannot be made as micro_batch_size x grad_accum_steps x "
            f"data-parallel size on {world} ranks{'' if fixed is None else f' with train.micro_batch_size={fixed}'} "
            f"(data-parallel size {' or '.join(map(str, dps))}); accepted: a multiple of "
            f"{' or '.join(map(str, multiples))}"
        )
    return out


def search(
    hf_config: Any,
    plan: Sequence[Any],
    hw: Hardware,
    *,
    world: int,
    global_batch: int,
    seq_len: int,
    precision: str = "fp32",
    layout: str = "concat",
    stages: Sequence[int] | None = None,
    micro_batch_sizes: Sequence[int] | None = None,
    intervals: Sequence[int] = CHECKPOINT_INTERVALS,
    zero_stages: Sequence[int] = (0, 1),
    trainable: Sequence[bool] | None = None,
    schedules: Sequence[str] = SCHEDULES,
    price: Callable[[Workload], LayerCosts] | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Every layout of the search space, best first; ``best`` is the fastest that fits (or None).

    ``stages``/``micro_batch_sizes``/``schedules`` restrict the space (default: every divisor that works);
    ``zero_stages`` drops ZeRO-0 for bf16, which DeepSpeed's pipeline refuses there. ``price``: the layer
    prices of one micro-batch shape (default: the ``flops`` model); ``calibration``: every price times the
    ratios a traced run measured (:mod:`pipefit.partition.calibrate`).
    """
    if price is None:
        price = functools.partial(flops_costs, hf_config, plan, hw=hw)
    n = len(plan)
    pps = [pp for pp in (stages or divisors(world)) if pp <= n]
    zeros = [z for z in zero_stages if not (precision == "bf16" and z == 0)]
    layouts = split_global_batch(global_batch, world, pps, micro_batch_sizes)
    candidates: list[dict[str, Any]] = []
    priced: dict[tuple[int, int, int], LayerCosts] = {}
    infeasible: set[tuple[int, int, int]] = set()  # (pp, zero, interval) that fit at no split
    fastest: dict[tuple[Any, ...], list[int]] = {}  # uncapped splits by (pp, prices)
    for pp, dp, micro, accum in layouts:  # micro-batch sizes ascending within each pp
        for zero in zeros:
            key = (micro, dp, zero)
            if key not in priced:
                priced[key] = price(Workload(seq_len, micro, 1, dp, precision, zero, layout))
                if calibration is not None:
                    priced[key] = apply_calibration(priced[key], calibration)
            base = with_micro_batches(priced[key], accum)
            work = Workload(seq_len, micro, accum, dp, precision, zero, layout)
            for k in intervals:
                if k > 1 and pp > 1 and k >= math.ceil(n / pp):
                    continue  # a group as long as the stage: interval 1's time, more memory
                costs = checkpointed(base, hf_config, plan, work, k)
                allowed = [x for x in schedules if x == "1f1b" or (pp >= 2 and precision != "fp16")]
                found = _candidate(costs, plan, pp, trainable, fastest, infeasible, (pp, zero, k), allowed)
                for schedule in allowed:
                    row = {key: v for key, v in found.items() if key != "predicted_step_by_schedule"}
                    row.update(pp=pp, dp=dp, micro_batch_size=micro, grad_accum_steps=accum)
                    row.update(activation_checkpoint_interval=k, zero_stage=zero, schedule=schedule)
                    row["predicted_step_s"] = found["predicted_step_by_schedule"][schedule]
                    row["tokens_per_s"] = global_batch * seq_len / row["predicted_step_s"]
                    candidates.append(row)
    candidates.sort(key=_rank)
    fitting = [c for c in candidates if c["fits"]]
    return {
        "world": world,
        "global_batch_size": global_batch,
        "seq_len": seq_len,
        "precision": precision,
        "memory_cap_bytes": hw.memory_gib * GIB,
        "hardware": hw.name,
        "candidates": candidates,
        "best": fitting[0] if fitting else None,
    }


def _rank(c: dict[str, Any]) -> tuple[Any, ...]:
    # Fitting first, fastest first; ties (equal predicted steps to 9 digits: summation order differs
    # between layouts of equal work) to less memory, then fewer stages, smaller micro-batches.
    speed = -float(f"{c['tokens_per_s']:.9g}") if c["fits"] else c["peak_memory_bytes"]
    tie = (c["pp"], c["micro_batch_size"], c["zero_stage"], c["schedule"] != "1f1b")
    return (not c["fits"], speed, c["peak_memory_bytes"], *tie)


def _candidate(
    costs: LayerCosts,
    plan: Sequence[Any],
    pp: int,
    trainable: Sequence[bool] | None,
    fastest: dict[tuple[Any, ...], list[int]],
    infeasible: set[tuple[int, int, int]],
    key: tuple[int, int, int],
    schedules: Sequence[str] = ("1f1b",),
) -> dict[str, Any]:
    """One layout's split and figures.

    The cost-optimal split ignoring memory is the answer whenever it fits (the capped one has the
    same bottleneck); only when it does not is the capped partitioner run. That split depends only
    on the per-layer prices, which are often equal between layouts (every interval >= 1 recomputes
    the same; under the flops model ``accum x micro`` rows cost the same however they are cut), so
    it is solved once per distinct ``(pp, prices)``. Memory grows with the
    micro-batch size (``micro x min(stages, accum)`` rows in flight), so a ``key`` that fit at no
    split for a smaller micro-batch is not tried again.
    """
    per_layer, cuts = costs.per_layer(), costs.boundary_costs()
    prices = (pp, *(f"{c:.12g}" for c in per_layer), *(f"{c:.12g}" for c in cuts))
    if prices not in fastest:
        fastest[prices] = partition_min_max(per_layer, pp, None, None, cuts, trainable)
    bounds = fastest[prices]
    weights = (
        weight_backward_s(costs.forward_s, costs.backward_s, costs.flops, plan, trainable) if costs.flops else None
    )
    report = evaluate(costs, plan, bounds, weight_s=weights, schedules=schedules)
    if not report["fits_memory"] and key not in infeasible:
        try:
            bounds = partition_min_max(per_layer, pp, costs.memory, costs.memory_cap, cuts, trainable)
            report = evaluate(costs, plan, bounds, weight_s=weights, schedules=schedules)
        except PartitionError:
            infeasible.add(key)  # reported with the cost-optimal split and how far over the cap it is
    return {
        "boundaries": list(bounds),
        "predicted_step_by_schedule": report["predicted_step_by_schedule"],
        "peak_memory_bytes": report["peak_memory_bytes"],
        "fits": bool(report["fits_memory"]),
    }


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def format_search(result: dict[str, Any], limit: int = 20) -> str:
    """The ranked table: fitting layouts best first, then the rejected ones and by how much they miss."""
    cap = result["memory_cap_bytes"]
    cands = result["candidates"]
    fitting = [c for c in cands if c["fits"]]
    lines = [
        f"pipefit plan --search: {result['world']} ranks, global batch {result['global_batch_size']} x "
        f"{result['seq_len']} tokens, {result['precision']}, hardware={result['hardware']} ({_gib(cap)} GiB); "
        f"{len(cands)} layouts, {len(fitting)} fit",
        f"{'#':>3} {'pp':>3} {'dp':>3} {'micro':>5} {'accum':>5} {'ckpt':>4} {'zero':>4} {'sched':>5} {'step':>10} "
        f"{'tokens/s':>12} {'tok/s/rank':>10} {'peak GiB':>8}  boundaries / why rejected",
    ]
    world = result["world"]
    for i, c in enumerate(fitting[:limit] + [c for c in cands if not c["fits"]][: max(0, limit - len(fitting))]):
        step = c["predicted_step_s"]
        why = str(c["boundaries"]) if c["fits"] else f"does not fit: {_gib(c['peak_memory_bytes'] - cap)} GiB over"
        lines.append(
            f"{i + 1 if c['fits'] else '-':>3} {c['pp']:>3} {c['dp']:>3} {c['micro_batch_size']:>5} "
            f"{c['grad_accum_steps']:>5} {c['activation_checkpoint_interval']:>4} {c['zero_stage']:>4} "
            f"{c['schedule']:>5} "
            f"{step:>9.3f}s {c['tokens_per_s']:>12,.0f} {c['tokens_per_s'] / world:>10,.0f} "
            f"{_gib(c['peak_memory_bytes']):>8}  {why}"
        )
    shown = min(limit, len(cands))
    if shown < len(cands):
        lines.append(f"... {len(cands) - shown} more (--json lists every layout)")
    best = result["best"]
    if best is None:
        least = min(cands, key=lambda c: c["peak_memory_bytes"])
        lines.append(f"no layout fits: the leanest needs {_gib(least['peak_memory_bytes'])} GiB per rank")
    return "\n".join(lines)


def search_run(
    run: Any,
    world: int,
    plan: Sequence[Any] | None = None,
    hf_config: Any = None,
    costs_model: str = "flops",
    contended: bool = False,
    device: str = "cpu",
    cache_dir: str | None = None,
    **limits: Any,
) -> dict[str, Any]:
    """:func:`search` for a validated run on ``world`` ranks (``pipefit plan --search``).

    ``limits`` (``stages``, ``micro_batch_sizes``, ``intervals``, ``zero_stages``, ``trainable``,
    ``calibration``) narrow the space; by default every layout is tried. ``costs_model="profile"`` measures
    each micro-batch shape (on CPU with ``contended``: with all ``world`` ranks busy) instead of ``flops``.
    """
    if run.train.global_batch_size is None:
        raise ConfigError(
            "train.global_batch_size is not set; the layout search needs the sequences per optimizer step, "
            "e.g. train.global_batch_size=512"
        )
    if world < 1:
        raise ConfigError(f"--world={world} is not accepted; expected an integer >= 1")
    skeleton = None
    if plan is None or hf_config is None or costs_model != "flops":
        hf_config = load_hf_config(run.model.path, dict(run.model.hf_config))
        set_attn_implementation(hf_config, run.model.attn_implementation)
        skeleton = make_skeleton(hf_config, seed=run.train.seed)
        plan = layer_plan(skeleton)
    hw = Hardware.from_config(run.hardware)
    if skeleton is not None and costs_model != "flops":
        ranks = world if contended and device == "cpu" else 1
        limits["price"] = functools.partial(
            price_layers, skeleton, costs_model, hw=hw, device=device, cache_dir=cache_dir, ranks=ranks
        )
    return search(
        hf_config,
        plan,
        hw,
        world=world,
        global_batch=run.train.global_batch_size,
        seq_len=run.data.seq_len,
        precision=run.train.precision,
        layout=run.data.layout,
        **limits,
    )


def resolve_auto(
    run: Any,
    world: int,
    hf_config: Any = None,
    plan: Sequence[Any] | None = None,
    trainable: Sequence[bool] | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """A copy of ``run`` whose ``auto`` layout fields hold the search's best layout for ``world`` ranks.

    Fields not ``auto`` stay fixed (and so narrow the search); ``zero.stage`` is the run's. The
    result names its split explicitly (``pipeline.partition=manual`` and ``pipeline.boundaries``),
    so the resolved ``config.yaml`` repeats the run exactly. Deterministic (flops prices only):
    every rank computes the same answer. Returns ``(run, None)`` when nothing is ``auto``.

    Raises:
        ConfigError: no micro x accum x dp makes the global batch, or no layout fits the memory.
    """
    auto = auto_fields(run)
    if not auto:
        return run, None
    p, t = run.pipeline, run.train
    micro = None if t.micro_batch_size == AUTO else [t.micro_batch_size]
    if micro is None and "flash" in (run.model.attn_implementation or "") and run.data.layout == "pack":
        micro = [1]  # HF's flash path keeps packed documents apart only in one-row micro-batches
    interval = p.activation_checkpoint_interval
    result = search_run(
        run,
        world,
        plan,
        hf_config,
        stages=None if p.stages == AUTO else [p.stages],
        micro_batch_sizes=micro,
        intervals=CHECKPOINT_INTERVALS if interval == AUTO else [interval],
        zero_stages=[run.zero.stage],
        trainable=trainable,
        schedules=[p.schedule],  # auto keeps the run's own schedule
    )
    best = result["best"]
    named = ", ".join(f"{name}=auto" for name in auto)
    if best is None:
        least = min(result["candidates"], key=lambda c: c["peak_memory_bytes"])
        raise ConfigError(
            f"{named}: no layout of {world} ranks fits hardware.memory_gib={run.hardware.memory_gib} "
            f"({run.hardware.name}); the leanest (pp={least['pp']}, micro_batch_size={least['micro_batch_size']}, "
            f"activation_checkpoint_interval={least['activation_checkpoint_interval']}) needs "
            f"{least['peak_memory_bytes'] / GIB:.2f} GiB per rank; use more ranks or a smaller "
            "train.global_batch_size or data.seq_len"
        )
    resolved = copy.deepcopy(run)
    resolved.pipeline.stages = best["pp"]
    resolved.pipeline.activation_checkpoint_interval = best["activation_checkpoint_interval"]
    resolved.pipeline.partition = "manual"
    resolved.pipeline.boundaries = list(best["boundaries"])
    resolved.train.micro_batch_size = best["micro_batch_size"]
    resolved.train.grad_accum_steps = best["grad_accum_steps"]
    chosen = {k: best[k] for k in LAYOUT_KEYS}
    chosen.update(auto=auto, candidates=len(result["candidates"]), world=world)
    return resolved, chosen


LAYOUT_KEYS = (
    "pp",
    "dp",
    "micro_batch_size",
    "grad_accum_steps",
    "activation_checkpoint_interval",
    "zero_stage",
    "schedule",
    "boundaries",
    "predicted_step_s",
    "tokens_per_s",
    "peak_memory_bytes",
    "fits",
)
