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

from pipefit.partition.zero_bubble_sim import close_step, one_f_one_b_order, simulate

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
    orders = [one_f_one_b_order(p, m, s) for s in range(p)]
    _, spans = simulate(orders, forward_s, backward_s, [0.0] * p, transfer_s)  # the shared event loop
    return Timeline(*close_step(spans, step_s, tied_stages))
