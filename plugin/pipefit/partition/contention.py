"""A stage computes slower while its peers compute than while they wait: contention by overlap.

On a CPU the ranks share the cores' caches and memory bandwidth. The contended profile
(:mod:`pipefit.partition.contended`) times every layer twice, back to back: with every rank computing
(``both``) and with the other ranks waiting (``alone``). A stage in a real step computes at a mix of the two,
``alone + (both - alone) * u``, where ``u`` is the share of the step its peers spend computing (the mean over
the other stages of busy / step, at most 1): a stage of a balanced split, whose peer computes most of the
time, pays nearly ``both``; the heavy stage of an unbalanced one, whose peer mostly waits for it, nearer
``alone``. ``u`` follows from the prices and the prices from ``u``: :func:`settle` alternates the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["peer_busy", "settle"]

ROUNDS = 6


def peer_busy(busy: Sequence[float], step_s: float) -> list[float]:
    """Per stage, the share of the step its peers compute (``busy``: each stage's compute seconds)."""
    p = len(busy)
    if p < 2 or step_s <= 0:
        return [1.0] * p
    return [min(1.0, sum(busy[o] for o in range(p) if o != s) / ((p - 1) * step_s)) for s in range(p)]


def settle(
    simulate: Callable[[list[float], list[float]], Any],
    both: tuple[Sequence[float], Sequence[float]],
    alone: tuple[Sequence[float], Sequence[float]],
    rounds: int = ROUNDS,
) -> tuple[list[float], list[float], list[float]]:
    """Per-stage forward and backward seconds of one micro-batch, each between its ``alone`` and ``both``
    price by how busy the stage's peers are in ``simulate(forward, backward)`` (a timeline with ``busy(s)``
    and ``step_s``), starting from ``both`` and repeated ``rounds`` times; and those busy shares ``u``."""
    forward, backward = list(both[0]), list(both[1])
    p = len(forward)
    u = [1.0] * p
    for _ in range(rounds):
        timeline = simulate(forward, backward)
        u = peer_busy([timeline.busy(s) for s in range(p)], timeline.step_s)
        forward = [a + (c - a) * x for a, c, x in zip(alone[0], both[0], u, strict=True)]
        backward = [a + (c - a) * x for a, c, x in zip(alone[1], both[1], u, strict=True)]
    return forward, backward, u
