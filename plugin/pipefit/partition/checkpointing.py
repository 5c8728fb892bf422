"""Activation checkpointing, priced: the recompute it adds and the memory it keeps per stage.

Activation checkpointing (DeepSpeed's ``activation_checkpoint_interval=k``: each stage runs its
layers in groups of ``k``, every group with parameters checkpointed) is priced here, since the
cost model prices a plain forward: every layer's backward also recomputes its forward, and a
stage keeps, per micro-batch in flight, only each group's input (hidden states and position ids)
plus, during one group's backward, that group's whole saved activations for one micro-batch. The
head keeps its full activations (logits and the loss' log-softmax are held for the loss). An
interval above 1 recomputes as much as 1 and only trades saved inputs for a larger recomputed
group: it pays only where it needs less memory than interval 1, and ties in predicted time go
to the layout with less memory. Intervals as long as a whole stage are not tried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipefit.partition.balance import StageMemory
from pipefit.partition.costs import POSITION_ID_BYTES, LayerCosts, ModelShape, Workload

__all__ = ["CheckpointedMemory", "checkpointed"]


@dataclass(frozen=True)
class CheckpointedMemory(StageMemory):
    """:class:`StageMemory` under ``activation_checkpoint_interval=interval`` (see the module docstring).

    ``inputs``: per layer, the bytes of its input per micro-batch (saved when a group starts there);
    ``kept``: per layer, bytes saved per micro-batch in flight whatever the checkpointing (the head's).
    ``activation`` stays the full saved bytes; beyond ``kept``, a group's are held during its recompute,
    one group (one micro-batch) at a time.
    """

    interval: int = 1
    inputs: Sequence[float] = ()
    kept: Sequence[float] = ()

    def __post_init__(self) -> None:
        # Every (start, stop) once, so the partitioner's many span queries are lookups.
        n, k = len(self.static), self.interval
        # What a group's recompute adds is what its layers save beyond the bytes kept anyway.
        recomputed = [a - k for a, k in zip(self.activation, self.kept, strict=True)]
        static, kept, act = _prefix(self.static), _prefix(self.kept), _prefix(recomputed)
        table: dict[tuple[int, int], tuple[float, float, float]] = {}
        for start in range(n):
            saved, recompute = 0.0, 0.0
            for g in range(start, n, k):
                saved += self.inputs[g]
                for stop in range(g + 1, min(g + k, n) + 1):
                    group = act[stop] - act[g]
                    table[(start, stop)] = (
                        static[stop] - static[start],
                        saved + kept[stop] - kept[start],
                        max(recompute, group),
                    )
                recompute = max(recompute, act[min(g + k, n)] - act[g])
        object.__setattr__(self, "_table", table)

    def stage_bytes(self, stage: int, num_stages: int, start: int, stop: int) -> float:
        static, saved, recompute = self._table[(start, stop)]  # type: ignore[attr-defined]
        return self.fixed + static + self.in_flight(stage, num_stages) * saved + recompute


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + float(v))
    return out


def checkpointed(
    costs: LayerCosts, hf_config: Any, plan: Sequence[Any], workload: Workload, interval: int
) -> LayerCosts:
    """``costs`` with activation checkpointing every ``interval`` layers (0: ``costs`` unchanged)."""
    if interval == 0:
        return costs
    shape = ModelShape.from_config(hf_config)
    tokens = workload.micro_batch_size * workload.seq_len
    hidden_in = tokens * (shape.hidden * workload.act_bytes + POSITION_ID_BYTES)
    inputs = [tokens * POSITION_ID_BYTES if x.kind == "embed" else hidden_in for x in plan]
    kept = [a if x.kind == "head" else 0.0 for x, a in zip(plan, costs.memory.activation, strict=True)]
    m = costs.memory
    memory = CheckpointedMemory(
        static=m.static,
        activation=m.activation,
        micro_batches=m.micro_batches,
        fixed=m.fixed,
        interval=interval,
        inputs=inputs,
        kept=kept,
    )
    backward = [f + b for f, b in zip(costs.forward_s, costs.backward_s, strict=True)]
    alone = [f + b for f, b in zip(costs.alone_forward_s, costs.alone_backward_s, strict=True)]
    return dataclasses.replace(
        costs, method=f"{costs.method}+checkpoint", backward_s=backward, alone_backward_s=alone, memory=memory
    )
