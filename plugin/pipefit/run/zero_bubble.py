"""Zero-bubble pipelining (ZB-H1, Qi et al. 2024) as a schedule for DeepSpeed's ``PipelineEngine``.

Each backward is split into B (gradients of the stage's inputs and of the parameters whose split
does not pay) and W (the weight-gradient GEMMs of the stage's trainable ``nn.Linear`` layers, see
:mod:`pipefit.run.split_backward`). The order of F and B on every stage is exactly 1F1B's (same
warm-up forwards, same in-flight activations, same pipe buffers); stage ``s`` runs a W after each
B except its first ``s``, which wait until its last B: the later stages, on the gradients' critical
path, hand each B on without its W and fill the time 1F1B leaves idle at their end with the
deferred W's (see :mod:`pipefit.partition.zero_bubble_sim`, which also simulates the step).
Every W runs before the step's ReduceTiedGrads / ReduceGrads / OptimizerStep, in micro-batch
order, so the optimizer sees the same gradients as with 1F1B.

:func:`zb_h1_order` (pure, in the partition layer) is the order; :func:`zb_h1_steps` turns it
into instruction names per step; :func:`schedule_class` builds the ``PipeSchedule`` subclass over
DeepSpeed's instruction types (imported on first use only). Sends follow their computation at
once, so the schedule relies on pipefit's non-blocking sends (pipefit.run.pipe_engine); the
engine refuses zb1p where DeepSpeed's blocking sends would be used.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from pipefit.partition.zero_bubble_sim import zb_h1_order


def num_pipe_buffers(stages: int, micro_batches: int, stage: int) -> int:
    """As DeepSpeed's TrainSchedule: at most ``stages - stage`` forwards wait for their B (at least 2)."""
    return max(2, min(stages - stage, micro_batches))


def zb_h1_steps(stages: int, micro_batches: int, stage: int) -> Iterator[list[tuple[str, dict[str, int]]]]:
    """Instruction names and arguments per step (one computation with its receive and send each)."""
    buffers = num_pipe_buffers(stages, micro_batches, stage)
    first, last = stage == 0, stage == stages - 1
    ops = zb_h1_order(stages, micro_batches, stage)
    for n, (kind, mb) in enumerate(ops):
        buf = {"buffer_id": mb % buffers}
        cmds: list[tuple[str, dict[str, int]]] = []
        if kind == "F":
            if not first:
                cmds.append(("RecvActivation", buf))
            if first or last:
                cmds.append(("LoadMicroBatch", buf))
            cmds.append(("ForwardPass", buf))
            if not last:
                cmds.append(("SendActivation", buf))
        elif kind == "B":
            if not last:
                cmds.append(("RecvGrad", buf))
            cmds.append(("BackwardInput", {**buf, "micro_batch_id": mb}))
            if not first:
                cmds.append(("SendGrad", buf))
        else:
            cmds.append(("BackwardWeight", {"micro_batch_id": mb}))
        if n == len(ops) - 1:
            cmds += [("ReduceTiedGrads", {}), ("ReduceGrads", {}), ("OptimizerStep", {})]
        yield cmds


class ZeroBubbleInstruction:
    """An instruction of pipefit's own, run by the engine's map like DeepSpeed's (``kwargs`` as theirs)."""

    def __init__(self, **kwargs: int) -> None:
        self.name = type(self).__name__
        self.kwargs = kwargs
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


class BackwardInput(ZeroBubbleInstruction):
    """B: backward of micro-batch ``micro_batch_id`` (in ``buffer_id``) with weight GEMMs queued for W."""


class BackwardWeight(ZeroBubbleInstruction):
    """W: the queued weight-gradient GEMMs of micro-batch ``micro_batch_id``, accumulated into ``.grad``."""


@functools.cache
def schedule_class() -> type:
    """``ZeroBubbleH1Schedule``: a DeepSpeed ``PipeSchedule`` yielding :func:`zb_h1_steps` as instructions."""
    from deepspeed.runtime.pipe import schedule as ds  # heavy; plan and verify never import it

    kinds: dict[str, Any] = {
        name: getattr(ds, name)
        for name in (
            "RecvActivation",
            "LoadMicroBatch",
            "ForwardPass",
            "SendActivation",
            "RecvGrad",
            "SendGrad",
            "ReduceTiedGrads",
            "ReduceGrads",
            "OptimizerStep",
        )
    }
    kinds.update(BackwardInput=BackwardInput, BackwardWeight=BackwardWeight)

    def steps(self: Any) -> Iterator[list[Any]]:
        for cmds in zb_h1_steps(self.stages, self.micro_batches, self.stage_id):
            yield [kinds[name](**kwargs) for name, kwargs in cmds]

    def buffers(self: Any) -> int:
        return num_pipe_buffers(self.stages, self.micro_batches, self.stage_id)

    namespace = {"__module__": __name__, "steps": steps, "num_pipe_buffers": buffers}
    return type("ZeroBubbleH1Schedule", (ds.PipeSchedule,), namespace)
