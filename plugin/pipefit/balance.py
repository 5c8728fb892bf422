"""Stage partitioning: pure functions from per-layer figures to stage boundaries.

Boundaries are ``num_stages + 1`` increasing layer indices ``[0, b1, ..., num_layers]``; stage
``s`` owns layers ``[b[s], b[s+1])``. Nothing here touches torch.distributed or builds a layer.

``uniform``, ``parameters`` and ``type:REGEX`` reproduce DeepSpeed's ``PipelineModule``
partitioning exactly (the same algorithms over the same per-layer figures), but from figures the
caller computes on the meta device, so no rank builds a layer it will not own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "PartitionError",
    "check_boundaries",
    "partition_balanced",
    "partition_uniform",
    "resolve_partition",
]

METHODS = ("uniform", "parameters", "type:REGEX", "manual")


class PartitionError(ValueError):
    """A partition request that cannot be satisfied; the message says what would be accepted."""


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Equal layer counts; the first ``num_items % num_parts`` stages get one more (DeepSpeed's rule)."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """DeepSpeed's weighted split: the contiguous split minimising (heaviest - lightest) stage.

    Same dynamic programme, tie-breaking and result as ``deepspeed.runtime.utils.partition_balanced``.
    """
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + float(w)
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    dp_max[0][0] = 0.0
    dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], part)
                min_sum = min(dp_min[k][j - 1], part)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j] = cost
                    dp_max[i][j] = max_sum
                    dp_min[i][j] = min_sum
                    position[i][j] = k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    parts.reverse()
    return parts


def check_boundaries(boundaries: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    """Validate manual boundaries ``[0, ..., num_layers]`` (``num_stages + 1`` strictly increasing ints)."""
    values = list(boundaries)
    accepted = f"{num_stages + 1} strictly increasing integers from 0 to {num_layers}"
    if len(values) != num_stages + 1:
        raise PartitionError(
            f"pipeline.boundaries={values} has {len(values)} entries for pipeline.stages={num_stages}; "
            f"expected {accepted}"
        )
    if values[0] != 0 or values[-1] != num_layers:
        raise PartitionError(
            f"pipeline.boundaries={values} must start at 0 and end at {num_layers}; expected {accepted}"
        )
    for s in range(num_stages):
        if values[s + 1] <= values[s]:
            raise PartitionError(
                f"pipeline.boundaries={values} gives stage {s} no layers (or is unsorted); expected {accepted}"
            )
    return [int(v) for v in values]


def resolve_partition(
    method: str,
    num_stages: int,
    param_counts: Sequence[int],
    type_names: Sequence[Sequence[str]],
    boundaries: Sequence[int] | None = None,
) -> list[int]:
    """Boundaries for ``pipeline.partition=method``.

    Args:
        method: ``uniform``, ``parameters``, ``type:REGEX`` or ``manual``.
        num_stages: pipeline stages.
        param_counts: trainable parameters per layer, as DeepSpeed counts them (a tied layer
            counts its whole tied module at each place it appears).
        type_names: names each layer answers to for ``type:`` (case-insensitive regex search).
        boundaries: the boundaries for ``manual``.
    """
    num_layers = len(param_counts)
    if num_stages < 1:
        raise PartitionError(f"pipeline.stages={num_stages} must be at least 1")
    if num_stages > num_layers:
        raise PartitionError(
            f"pipeline.stages={num_stages} exceeds the {num_layers} pipeline layers of this model "
            f"(embedding, blocks, final norm, head); use at most {num_layers} stages"
        )
    if method == "manual":
        if boundaries is None:
            raise PartitionError(
                f"pipeline.partition=manual needs pipeline.boundaries: "
                f"{num_stages + 1} strictly increasing integers from 0 to {num_layers}"
            )
        return check_boundaries(boundaries, num_layers, num_stages)
    if boundaries is not None:
        raise PartitionError(
            f"pipeline.boundaries={list(boundaries)} is only used with pipeline.partition=manual, "
            f"not pipeline.partition={method}"
        )
    if method == "uniform":
        return partition_uniform(num_layers, num_stages)
    if method == "parameters":
        return partition_balanced(param_counts, num_stages)
    if method.lower().startswith("type:"):
        pattern = method.split(":", 1)[1]
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise PartitionError(f"pipeline.partition={method}: {pattern!r} is not a valid regex ({exc})") from None
        hits = [int(any(regex.search(n) for n in names)) for names in type_names]
        if not any(hits):
            known = sorted({n for names in type_names for n in names})
            raise PartitionError(f"pipeline.partition={method} matches no layer; layer types: {', '.join(known)}")
        return partition_balanced(hits, num_stages)
    raise PartitionError(f"pipeline.partition={method!r} is not a partition method; accepted: {', '.join(METHODS)}")
