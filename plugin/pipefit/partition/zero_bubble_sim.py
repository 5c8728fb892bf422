"""Zero-bubble ZB-H1: the per-stage order of F, B and W (pure), and an event simulation of one step.

:func:`zb_h1_order` is the order ``pipeline.schedule=zb1p`` runs (pipefit.run.zero_bubble turns it
into DeepSpeed instructions): 1F1B's F/B order, with the first ``stage`` weight passes W of each
stage deferred to its end, where a 1F1B stage would be idle.
:func:`simulate` times any such order (F needs the previous stage's F; B the next stage's B, or
this F on the last stage; W this stage's B), so 1F1B (``split=False``: B is the whole backward, no
W) and ZB-H1 compare under the same per-stage costs. ``pipefit plan`` prices zb1p with
:func:`simulate_zb1p` and :func:`weight_backward_s` (W per layer from its FLOPs).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple


class Op(NamedTuple):
    """One computation of one stage: ``kind`` F (forward), B (input backward) or W (weight backward)."""

    kind: str
    micro_batch: int


def one_f_one_b_order(stages: int, micro_batches: int, stage: int) -> list[Op]:
    """DeepSpeed's 1F1B for ``stage``: ``stages - 1 - stage`` warm-up forwards, then F/B pairs."""
    warmup = min(stages - 1 - stage, micro_batches)
    ops = [Op("F", i) for i in range(warmup)]
    for b in range(micro_batches):
        if warmup + b < micro_batches:
            ops.append(Op("F", warmup + b))
        ops.append(Op("B", b))
    return ops


def zb_h1_order(stages: int, micro_batches: int, stage: int) -> list[Op]:
    """The ZB-H1 order of F, B and W for ``stage``: 1F1B's F/B order; the first ``stage`` W passes wait.

    Stage ``s`` runs a W after each of its B's except the first ``s`` (the rule of
    torch.distributed.pipelining's zero-bubble 1F1B ranks), the W's held back run after its last
    B. So later stages, on the critical path of the gradients, return each B without its W, and
    their deferred W's fill the time 1F1B leaves idle after their last backward. With F, B, W of
    one cost each, a step takes ``m (F+B+W) + (p-1)(F+B-W)`` against 1F1B's ``(m+p-1)(F+B+W)``.
    """
    ops: list[Op] = []
    pending: deque[int] = deque()
    for op in one_f_one_b_order(stages, micro_batches, stage):
        ops.append(op)
        if op.kind == "B":
            pending.append(op.micro_batch)
            if op.micro_batch >= stage:
                ops.append(Op("W", pending.popleft()))
    ops.extend(Op("W", i) for i in pending)
    return ops


def simulate(
    orders: Sequence[Sequence[Op]],
    forward_s: Sequence[float],
    backward_input_s: Sequence[float],
    backward_weight_s: Sequence[float],
    transfer_s: float = 0.0,
) -> tuple[float, list[list[tuple[str, int, float, float]]]]:
    """Step time and per-stage spans ``(kind, micro_batch, start, end)`` of ``orders`` (one list per stage)."""
    p = len(orders)
    cost = {"F": forward_s, "B": backward_input_s, "W": backward_weight_s}
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * p
    nxt = [0] * p
    spans: list[list[tuple[str, int, float, float]]] = [[] for _ in range(p)]
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                kind, i = orders[s][nxt[s]]
                if kind == "F":
                    dep = None if s == 0 else ("F", s - 1, i)
                elif kind == "B":
                    dep = ("F", s, i) if s == p - 1 else ("B", s + 1, i)
                else:
                    dep = ("B", s, i)
                if dep is not None and dep not in done:
                    break
                ready = 0.0 if dep is None else done[dep] + (transfer_s if dep[1] != s else 0.0)
                start = max(free[s], ready)
                free[s] = start + cost[kind][s]
                done[(kind, s, i)] = free[s]
                spans[s].append((kind, i, start, free[s]))
                nxt[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("simulate: the orders deadlock (a computation waits on one that never runs)")
    return max(free), spans


# Layer kinds whose backward is all input gradient (B): a norm's and an embedding's weight gradients
# are elementwise or a scatter-add, not a GEMM; a tied head's weight gradient lands on the embedding.
NO_WEIGHT_GEMM = ("embed", "norm")


def weight_backward_s(
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    flops: Sequence[Any],
    plan: Sequence[Any],
    trainable: Sequence[bool] | None = None,
) -> list[float]:
    """Per layer, the seconds of its backward that are W (the weight-gradient GEMMs).

    A layer's backward matmuls are twice its forward matmuls, half of them the weight gradient:
    W is the matmul share of its forward time (``forward_s x matmul / forward`` FLOPs), at most its
    backward. Norms, embeddings, a tied head and frozen layers (``trainable`` False) have no W.
    """
    out = []
    for i, (f, b, fl, layer) in enumerate(zip(forward_s, backward_s, flops, plan, strict=True)):
        frozen = trainable is not None and not trainable[i]
        if frozen or layer.kind in NO_WEIGHT_GEMM or layer.tied or fl.backward_override is not None or fl.forward <= 0:
            out.append(0.0)
        else:
            out.append(min(float(b), float(f) * fl.matmul / fl.forward))
    return out


def simulate_zb1p(
    forward_s: Sequence[float],
    backward_input_s: Sequence[float],
    backward_weight_s: Sequence[float],
    micro_batches: int,
    transfer_s: float = 0.0,
    step_s: Sequence[float] | None = None,
    tied_stages: Sequence[int] = (),
) -> tuple[float, list[tuple[int, str, int, float, float]]]:
    """One ZB-H1 step as ``pipefit plan`` prices 1F1B: the step time and ops ``(stage, kind, micro, start, end)``.

    After its last W each stage reduces its gradients (tied stages wait for each other) and steps.
    """
    p, m = len(forward_s), int(micro_batches)
    orders = [zb_h1_order(p, m, s) for s in range(p)]
    _, spans = simulate(orders, forward_s, backward_input_s, backward_weight_s, transfer_s)
    return close_step(spans, step_s, tied_stages)


def close_step(
    spans: Sequence[Sequence[tuple[str, int, float, float]]],
    step_s: Sequence[float] | None = None,
    tied_stages: Sequence[int] = (),
) -> tuple[float, list[tuple[int, str, int, float, float]]]:
    """The step after :func:`simulate`'s ``spans``: each stage, once its last computation is done, reduces its
    gradients and steps its optimizer (``step_s`` per stage; stages sharing a tied weight start together).
    Returns the step time and every op ``(stage, kind, micro, start, end)``, the per-step work as ``step``."""
    p = len(spans)
    ops = [(s, kind, i, start, end) for s in range(p) for kind, i, start, end in spans[s]]
    finish = [max(end for *_, end in spans[s]) for s in range(p)]
    tied = [s for s in tied_stages if 0 <= s < p]
    if len(set(tied)) > 1:
        sync = max(finish[s] for s in tied)
        for s in tied:
            finish[s] = sync
    per_step = list(step_s) if step_s is not None else [0.0] * p
    ops += [(s, "step", -1, finish[s], finish[s] + per_step[s]) for s in range(p)]
    return max(finish[s] + per_step[s] for s in range(p)), ops
