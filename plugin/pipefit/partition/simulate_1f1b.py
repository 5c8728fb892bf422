"""Event simulation of one training step under DeepSpeed's 1F1B schedule.

Stage ``s`` runs ``min(p - s - 1, m)`` warm-up forwards, then alternates one forward and one backward,
then drains its backwards; a forward waits for the previous stage's forward of the same micro-batch and a
backward for the next stage's backward, each plus one boundary transfer. After its last backward each
stage reduces its gradients (the stages sharing a tied embedding wait for each other) and steps its
optimizer; the step ends when the last stage is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Timeline", "bubble_fraction", "simulate_1f1b"]


@dataclass
class Timeline:
    """What :func:`simulate_1f1b` found: the step time and every operation's start and end."""

    step_s: float
    # (stage, "F" | "B" | "step", micro-batch or -1, start, end)
    ops: list[tuple[int, str, int, float, float]] = field(default_factory=list)

    def busy(self, stage: int) -> float:
        return sum(end - start for s, kind, _, start, end in self.ops if s == stage and kind in "FBW")


def bubble_fraction(num_stages: int, micro_batches: int) -> float:
    """Idle share of an ideal 1F1B step with equal stages: (p - 1) / (m + p - 1)."""
    return (num_stages - 1) / (micro_batches + num_stages - 1)


def _order_1f1b(stage: int, num_stages: int, micro_batches: int) -> list[tuple[str, int]]:
    warm = min(num_stages - stage - 1, micro_batches)
    order = [("F", i) for i in range(warm)]
    for i in range(micro_batches - warm):
        order += [("F", warm + i), ("B", i)]
    order += [("B", i) for i in range(micro_batches - warm, micro_batches)]
    return order


def simulate_1f1b(
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    micro_batches: int,
    transfer_s: float = 0.0,
    step_s: Sequence[float] | None = None,
    tied_stages: Sequence[int] = (),
) -> Timeline:
    """Event simulation of one training step under 1F1B (see the module docstring).

    Args:
        forward_s, backward_s: per stage, seconds for one micro-batch.
        micro_batches: micro-batches per step.
        transfer_s: seconds for activations (or gradients) to cross one boundary.
        step_s: per stage, the per-step work after the last backward (reduction, optimizer).
        tied_stages: stages that all-reduce a tied weight: each starts its per-step work only
            when all of them have finished their backwards.
    """
    p, m = len(forward_s), int(micro_batches)
    if len(backward_s) != p or p < 1 or m < 1:
        raise ValueError(f"simulate_1f1b: {p} forward and {len(backward_s)} backward times, {m} micro-batches")
    orders = [_order_1f1b(s, p, m) for s in range(p)]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * p
    nxt = [0] * p
    ops: list[tuple[int, str, int, float, float]] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                kind, i = orders[s][nxt[s]]
                if kind == "F":
                    dep = None if s == 0 else ("F", s - 1, i)
                else:
                    dep = ("F", s, i) if s == p - 1 else ("B", s + 1, i)
                if dep is not None and dep not in done:
                    break
                ready = 0.0 if dep is None else done[dep] + (transfer_s if dep[1] != s else 0.0)
                start = max(free[s], ready)
                end = start + (forward_s[s] if kind == "F" else backward_s[s])
                done[(kind, s, i)] = end
                free[s] = end
                ops.append((s, kind, i, start, end))
                nxt[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - 1F1B cannot deadlock; a guard against future edits
            raise RuntimeError("simulate_1f1b: schedule deadlocked")
    finish = list(free)
    tied = [s for s in tied_stages if 0 <= s < p]
    if len(set(tied)) > 1:
        sync = max(finish[s] for s in tied)
        for s in tied:
            finish[s] = sync
    per_step = list(step_s) if step_s is not None else [0.0] * p
    for s in range(p):
        ops.append((s, "step", -1, finish[s], finish[s] + per_step[s]))
    return Timeline(step_s=max(finish[s] + per_step[s] for s in range(p)), ops=ops)
