"""Stage partitioning: pure functions from per-layer figures to stage boundaries.

Boundaries are ``num_stages + 1`` increasing layer indices ``[0, b1, ..., num_layers]``; stage
``s`` owns layers ``[b[s], b[s+1])``. Nothing here touches torch.distributed or builds a layer.

``uniform``, ``parameters`` and ``type:REGEX`` reproduce DeepSpeed's ``PipelineModule``
partitioning exactly (the same algorithms over the same per-layer figures), but from figures the
caller computes on the meta device, so no rank builds a layer it will not own.

``flops`` and ``profile`` price each layer (:mod:`pipefit.partition.costs`) and solve
:func:`partition_min_max`: the exact contiguous split with the cheapest slowest stage, under a
per-stage memory cap that follows what 1F1B holds (:class:`StageMemory`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipefit.config import COST_METHODS

__all__ = [
    "PartitionError",
    "StageMemory",
    "check_boundaries",
    "partition_balanced",
    "partition_min_max",
    "partition_uniform",
    "resolve_partition",
    "stage_costs",
]

METHODS = ("uniform", "parameters", "flops", "profile", "type:REGEX", "manual")


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


MemoryModel = Callable[[int, int, int], float]


@dataclass(frozen=True)
class StageMemory:
    """Bytes a pipeline stage holds under DeepSpeed's 1F1B schedule.

    Stage ``s`` of ``p`` owning layers ``[start, stop)`` holds ``fixed`` + the ``static`` bytes of its
    layers (weights, gradients, optimizer state) + ``min(p - s, micro_batches)`` micro-batches of its
    layers' ``activation`` bytes: 1F1B runs ``p - s - 1`` warm-up forwards before the first backward
    reaches stage ``s``, so the first stage keeps the most activations alive.

    Attributes:
        static: per-layer bytes held for the whole step.
        activation: per-layer bytes saved for backward, per micro-batch.
        micro_batches: micro-batches per step (gradient accumulation steps).
        fixed: bytes every stage holds whatever its layers (communication buffers, runtime).
        params: per-layer trainable parameters; with ``bucket_elements``, a stage also holds a gradient
            bucket of ``min(bucket_elements, its trainable parameters)`` elements of ``bucket_bytes`` each
            (the part of ZeRO's reduction bucket its gradients fill).
    """

    static: Sequence[float]
    activation: Sequence[float]
    micro_batches: int
    fixed: float = 0.0
    params: Sequence[float] = ()
    bucket_elements: float = 0.0
    bucket_bytes: float = 0.0

    def in_flight(self, stage: int, num_stages: int) -> int:
        return max(1, min(num_stages - stage, self.micro_batches))

    def stage_bytes(self, stage: int, num_stages: int, start: int, stop: int) -> float:
        held = self.in_flight(stage, num_stages)
        bucket = self.bucket_bytes * min(self.bucket_elements, sum(self.params[start:stop])) if self.params else 0.0
        return self.fixed + bucket + sum(self.static[start:stop]) + held * sum(self.activation[start:stop])

    def bind(self, num_stages: int) -> MemoryModel:
        """The ``(stage, start, stop) -> bytes`` function :func:`partition_min_max` takes."""
        return lambda stage, start, stop: self.stage_bytes(stage, num_stages, start, stop)


def stage_costs(
    costs: Sequence[float], boundaries: Sequence[int], boundary_costs: Sequence[float] | None = None
) -> list[float]:
    """Cost of each stage: its layers' costs plus, when given, the cost of each cut it touches."""
    n = len(costs)
    out = []
    for a, b in zip(boundaries[:-1], boundaries[1:], strict=True):
        c = 0.0
        for x in costs[a:b]:
            c += float(x)
        if boundary_costs is not None:
            c += (float(boundary_costs[a]) if a > 0 else 0.0) + (float(boundary_costs[b]) if b < n else 0.0)
        out.append(c)
    return out


def _fmt_amount(x: float) -> str:
    return f"{x:.6g} ({x / 2**30:.3f} GiB if bytes)" if x >= 2**20 else f"{x:.6g}"


def partition_min_max(
    costs: Sequence[float],
    num_stages: int,
    memory: Sequence[float] | MemoryModel | StageMemory | None = None,
    memory_cap: float | None = None,
    boundary_costs: Sequence[float] | None = None,
    trainable: Sequence[bool] | None = None,
) -> list[int]:
    """The contiguous split that minimises the slowest stage, exactly; no stage is empty.

    Ties are broken toward the most even split, defined as the smallest sum of squared stage
    costs (for equal totals, that is the split whose costs lie closest to the mean), and then
    toward the lexicographically largest boundaries: earlier stages take the extra layers, which
    the 1F1B simulation (:mod:`pipefit.partition.plan`) finds faster than the reverse when only the order of
    stage costs differs (memory is the cap's job, not the tie-break's).

    Two dynamic programmes over ``(stage, first layer)``, each O(num_stages * num_layers^2):
    the first finds the smallest achievable bottleneck ``B``; the second, among splits whose every
    stage costs at most ``B`` and fits ``memory_cap``, minimises the sum of squares.

    Args:
        costs: one non-negative cost per pipeline layer (any unit: FLOPs, seconds).
        num_stages: pipeline stages (at most ``len(costs)``).
        memory: per-stage memory: a per-layer sequence (summed), a ``(stage, start, stop) -> bytes``
            function, or a :class:`StageMemory` (weights + 1F1B in-flight activations per stage).
        memory_cap: the most memory a stage may hold; ``None`` for no limit.
        boundary_costs: ``num_layers + 1`` entries; entry ``b`` is added to both stages adjacent to
            a cut before layer ``b`` (the time to send activations and gradients across it).
        trainable: per layer, whether it has parameters to train (LoRA, frozen layers): every stage
            must hold one, since DeepSpeed builds no optimizer for a stage with nothing to train.

    Raises:
        PartitionError: bad input, or no split fits ``memory_cap`` (the message gives the smallest
            cap that would fit).
    """
    n, p = len(costs), int(num_stages)
    if p < 1:
        raise PartitionError(f"pipeline.stages={p} must be at least 1")
    if p > n:
        raise PartitionError(
            f"pipeline.stages={p} exceeds the {n} pipeline layers; a stage cannot be empty, use at most {n} stages"
        )
    for i, c in enumerate(costs):
        if not (math.isfinite(float(c)) and float(c) >= 0):
            raise PartitionError(f"cost of layer {i} is {c!r}; costs must be finite numbers >= 0")
    if boundary_costs is not None and len(boundary_costs) != n + 1:
        raise PartitionError(f"boundary_costs has {len(boundary_costs)} entries; expected {n + 1} (one per cut 0..{n})")
    if memory_cap is not None and memory is None:
        raise PartitionError(f"memory_cap={memory_cap} was given without a memory model; pass memory=")
    if trainable is not None and sum(bool(t) for t in trainable) < p:
        raise PartitionError(
            f"pipeline.stages={p}: only {sum(bool(t) for t in trainable)} of the {n} pipeline layers have "
            "parameters to train, and every stage needs one; use fewer stages"
        )
    mem: MemoryModel | None
    if memory is None:
        mem = None
    elif isinstance(memory, StageMemory):
        mem = memory.bind(p)
    elif callable(memory):
        mem = memory
    else:
        per_layer = [float(x) for x in memory]
        if len(per_layer) != n:
            raise PartitionError(f"memory has {len(per_layer)} entries for {n} layers; expected one per layer")
        mem = lambda stage, start, stop: sum(per_layer[start:stop])  # noqa: E731

    # seg[a][b - a]: summed left to right, the same way stage_costs sums.
    seg: list[list[float]] = []
    for a in range(n):
        row, acc = [0.0], 0.0
        for x in costs[a:]:
            acc += float(x)
            row.append(acc)
        seg.append(row)
    bc = [0.0] * (n + 1) if boundary_costs is None else [float(x) for x in boundary_costs]

    def cost(a: int, b: int) -> float:
        return seg[a][b - a] + (bc[a] if a > 0 else 0.0) + (bc[b] if b < n else 0.0)

    def spans(s: int) -> list[tuple[int, int]]:
        # Stage s starts at a >= s and must leave at least one layer for each later stage.
        return [(a, b) for a in range(s, n - (p - s) + 1) for b in range(a + 1, n - (p - s - 1) + 1)]

    fits: dict[tuple[int, int, int], float] = {}
    if mem is not None:
        for s in range(p):
            for a, b in spans(s):
                fits[(s, a, b)] = float(mem(s, a, b))
    cap = math.inf if memory_cap is None else float(memory_cap)

    def allowed(s: int, a: int, b: int) -> bool:
        if trainable is not None and not any(trainable[a:b]):
            return False
        return mem is None or fits[(s, a, b)] <= cap

    inf = math.inf
    # Phase 1: best[s][a] = smallest bottleneck of stages s..p-1 covering layers [a, n).
    best = [[inf] * (n + 1) for _ in range(p + 1)]
    best[p][n] = 0.0
    for s in reversed(range(p)):
        for a, b in spans(s):
            if best[s + 1][b] < inf and allowed(s, a, b):
                v = max(cost(a, b), best[s + 1][b])
                if v < best[s][a]:
                    best[s][a] = v
    if best[0][0] == inf:
        # The smallest cap any split fits: the same min-max programme over stage memory.
        need = [[inf] * (n + 1) for _ in range(p + 1)]
        need[p][n] = 0.0
        for s in reversed(range(p)):
            for a, b in spans(s):
                if need[s + 1][b] < inf and (trainable is None or any(trainable[a:b])):
                    need[s][a] = min(need[s][a], max(fits[(s, a, b)], need[s + 1][b]))
        raise PartitionError(
            f"memory_cap={_fmt_amount(cap)}: no split of {n} layers into {p} stages fits; "
            f"the smallest per-stage cap that would fit is {_fmt_amount(need[0][0])}"
        )
    bound = best[0][0]
    # Phase 2: among splits with every stage <= bound, the smallest sum of squared stage costs;
    # scanning b upward with <= keeps the largest boundary among equals.
    squares = [[inf] * (n + 1) for _ in range(p + 1)]
    choice = [[-1] * (n + 1) for _ in range(p + 1)]
    squares[p][n] = 0.0
    for s in reversed(range(p)):
        for a, b in spans(s):
            c = cost(a, b)
            if squares[s + 1][b] < inf and c <= bound and allowed(s, a, b):
                v = c * c + squares[s + 1][b]
                if v <= squares[s][a]:
                    squares[s][a] = v
                    choice[s][a] = b
    bounds = [0]
    for s in range(p):
        bounds.append(choice[s][bounds[-1]])
    return bounds


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
    costs: Sequence[float] | None = None,
    memory: Sequence[float] | MemoryModel | StageMemory | None = None,
    memory_cap: float | None = None,
    boundary_costs: Sequence[float] | None = None,
    trainable: Sequence[bool] | None = None,
) -> list[int]:
    """Boundaries for ``pipeline.partition=method``.

    Args:
        method: ``uniform``, ``parameters``, ``flops``, ``profile``, ``type:REGEX`` or ``manual``.
        num_stages: pipeline stages.
        param_counts: trainable parameters per layer, as DeepSpeed counts them (a tied layer
            counts its whole tied module at each place it appears).
        type_names: names each layer answers to for ``type:`` (case-insensitive regex search).
        boundaries: the boundaries for ``manual``.
        costs: per-layer costs for ``flops``/``profile`` (see :mod:`pipefit.partition.costs`), solved by
            :func:`partition_min_max` with ``memory``, ``memory_cap``, ``boundary_costs`` and ``trainable``.
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
    if method in COST_METHODS:
        if costs is None:
            raise PartitionError(
                f"pipeline.partition={method} needs per-layer costs (pipefit.partition.boundaries.price_layers) "
                "and none were given"
            )
        if len(costs) != num_layers:
            raise PartitionError(f"pipeline.partition={method}: {len(costs)} costs for {num_layers} layers")
        return partition_min_max(costs, num_stages, memory, memory_cap, boundary_costs, trainable)
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
