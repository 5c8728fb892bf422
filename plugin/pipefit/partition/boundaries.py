"""The one place that turns ``pipeline.partition`` into stage boundaries over the layer list."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pipefit.model.layer_list import layer_plan
from pipefit.model.layers import ModelSkeleton
from pipefit.model.tasks import TASKS, unpriced_error
from pipefit.partition import balance, contended, costs
from pipefit.partition.costs import Hardware, LayerCosts, Workload, flops_costs
from pipefit.partition.profile import profile_costs, profile_layers


def boundaries_for(
    skeleton: ModelSkeleton,
    method: str,
    num_stages: int,
    boundaries: list[int] | None,
    workload: Any = None,
    hardware: Any = None,
    layer_costs: Any = None,
    trainable: list[bool] | None = None,
) -> list[int]:
    """Stage boundaries for ``pipeline.partition=method``.

    ``flops`` and ``profile`` price the layers with :mod:`pipefit.partition.costs` (pass ``layer_costs``
    already computed, e.g. measured on rank 0 and broadcast, or a ``workload`` and ``hardware`` to
    price them here) and solve :func:`balance.partition_min_max` under ``hardware``'s memory cap.
    """
    plan = layer_plan(skeleton)
    extra: dict[str, Any] = {}
    if method in balance.COST_METHODS:
        if layer_costs is None:
            if workload is None:
                raise balance.PartitionError(
                    f"pipeline.partition={method} needs the micro-batch shape; "
                    "pass workload=costs.Workload.from_run(run)"
                )
            hw = costs.Hardware.from_config(hardware) if hardware is not None else costs.Hardware()
            layer_costs = price_layers(skeleton, method, workload, hw)
        extra = {
            "costs": layer_costs.per_layer(),
            "memory": layer_costs.memory,
            "memory_cap": layer_costs.memory_cap,
            "boundary_costs": layer_costs.boundary_costs(),
            "trainable": trainable,  # LoRA / train.freeze: every stage keeps a layer to train
        }
    params = [layer.num_params for layer in plan]
    return balance.resolve_partition(method, num_stages, params, [x.type_names for x in plan], boundaries, **extra)


def run_boundaries(skeleton: ModelSkeleton, run: Any, dp: int = 1) -> list[int]:
    """The boundaries a validated run asks for, without ranks: ``profile`` (measured once the ranks
    exist) is stood in for by ``flops``, as in the run's own pre-flight checks."""
    p = run.pipeline
    method = "flops" if p.partition == "profile" else p.partition
    workload = costs.Workload.from_run(run, dp)
    return boundaries_for(skeleton, method, p.stages, p.boundaries, workload=workload, hardware=run.hardware)


def price_layers(
    skeleton: Any,
    method: str,
    workload: Workload,
    hw: Hardware | None = None,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    measure: bool = True,
    broadcast: Callable[[Any], Any] | None = None,
    ranks: int = 1,
) -> LayerCosts:
    """:class:`LayerCosts` for ``method`` (``flops`` or ``profile``) over the skeleton's layer list.

    ``profile`` with ``ranks`` > 1 on CPU measures with that many processes busy at once, with measured
    transfers and per-step work (:mod:`pipefit.partition.contended`); it starts processes, so only
    ``pipefit plan`` and benchmarks ask for it.
    """

    if not TASKS[skeleton.task].priced:
        raise unpriced_error(skeleton.adapter, method)

    hw = hw or Hardware()
    plan = layer_plan(skeleton)
    if method == "flops":
        return flops_costs(skeleton.config, plan, workload, hw)
    if method == "profile" and ranks > 1 and device == "cpu":
        measured = contended.measure_contended(skeleton, plan, workload, ranks, cache_dir=cache_dir)
        return contended.contended_costs(skeleton.config, plan, workload, hw, measured)
    if method == "profile":
        profiles = profile_layers(skeleton, plan, workload, device, cache_dir, measure, broadcast)
        return profile_costs(skeleton.config, plan, workload, hw, profiles)
    raise ValueError(f"pipeline.partition={method!r} has no cost model; accepted: flops, profile")
