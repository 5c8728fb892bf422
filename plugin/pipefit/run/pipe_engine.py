"""pipefit's ``PipelineEngine``: DeepSpeed's, with each schedule instruction run through one hook.

``deepspeed.initialize`` builds a plain ``deepspeed.runtime.pipe.engine.PipelineEngine`` for a
``PipelineModule``; :func:`adopt` turns that one instance into :func:`engine_class` (its
``__class__`` set, nothing patched globally). The subclass changes what DeepSpeed does per step
only where the result is the same to the bit:

- ``_exec_schedule`` runs each instruction through :meth:`PipefitEngineMixin._run_instruction`,
  the one place a tracer (``train.trace``) hooks in; ``_INSTRUCTION_MAP`` maps DeepSpeed's
  instruction types to this class's overrides (another schedule adds its own types there);
- ``_aggregate_total_loss`` is traced as ``AggregateLoss`` (the last stage's loss broadcast);
- activations and gradients are sent without waiting for the receiver (``isend``, the same
  tensors in the same order), every send waited for before the schedule ends.

Private DeepSpeed API used (pinned in pyproject.toml, checked by tests/run/test_trace.py):
``_exec_schedule``, ``_INSTRUCTION_MAP``, ``_reserve_pipe_buffers``, ``fwd_outputs``,
``_aggregate_total_loss``, ``_exec_send_activations``/``_exec_send_grads`` and what they read
(``pipe_buffers``, ``first_output_send``, ``_send_tensor_meta``, ``next_stage``/``prev_stage``,
``grid.stage_to_global``, the flags of :meth:`PipefitEngineMixin._sends_async`). For
``pipeline.schedule=zb1p`` (checked by tests/run/test_zero_bubble.py): ``_train_schedule``,
``_exec_backward_pass``, ``grad_layer`` (the one received-gradient buffer), ``using_bf16_optimizer``
and the bf16 optimizer's ``clear_lp_grads``/``update_hp_grads``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from pipefit.run.split_backward import WeightGradQueue, install_split_linears
from pipefit.run.trace import Tracer
from pipefit.run.zero_bubble import BackwardInput, BackwardWeight, schedule_class

log = logging.getLogger("pipefit")


class PipefitEngineMixin:
    """The overrides; combined with DeepSpeed's ``PipelineEngine`` by :func:`engine_class`."""

    tracer: Tracer | None = None
    pipe_schedule: str = "1f1b"
    weight_grads: WeightGradQueue | None = None
    _INSTRUCTION_MAP: dict[type, Any]
    _pending_sends: list[Any]

    # --- zero-bubble (pipeline.schedule=zb1p; see pipefit.run.zero_bubble, .split_backward) ---------
    def use_schedule(self, name: str) -> None:
        """Train with ``name`` (1f1b: DeepSpeed's TrainSchedule; zb1p: ZB-H1 with the split backward)."""
        self.pipe_schedule = name
        if name == "zb1p":
            self.weight_grads = WeightGradQueue()
            split = install_split_linears(self.module, self.weight_grads)  # type: ignore[attr-defined]
            stage = getattr(self, "stage_id", -1)
            log.debug("pipeline.schedule=zb1p: stage %d defers the weight gradients of %d layers", stage, len(split))

    def _train_schedule(self) -> Any:
        e: Any = self
        if self.pipe_schedule != "zb1p":
            return super()._train_schedule()  # type: ignore[misc]
        if not self._sends_async():  # ZB-H1 sends right after computing: blocking sends could deadlock
            raise RuntimeError(
                "pipeline.schedule=zb1p needs pipefit's non-blocking sends, which this engine cannot use "
                "(dynamic shapes, attention masks, boolean or partitioned tensors, wall_clock_breakdown); "
                "use pipeline.schedule=1f1b"
            )
        opt = e.optimizer
        flags = ("immediate_grad_update", "use_grad_accum_attribute", "overlap_comm")
        hooked = [f for f in flags if getattr(opt, f, False)]
        if hooked:  # W accumulates into .grad directly: gradients taken in autograd hooks would miss it
            raise RuntimeError(
                f"pipeline.schedule=zb1p cannot be combined with {type(opt).__name__}.{hooked[0]}=True "
                "(gradients taken in autograd hooks); use pipeline.schedule=1f1b"
            )
        return schedule_class()(micro_batches=e.micro_batches, stages=e.num_stages, stage_id=e.stage_id)

    def _exec_backward_input(self, buffer_id: int, micro_batch_id: int) -> None:
        # DeepSpeed's whole backward (loss scaling, the bf16 optimizer's gradient moves), with the
        # Linear weight GEMMs queued for this micro-batch's W.
        assert self.weight_grads is not None
        received = self.grad_layer  # type: ignore[attr-defined]
        with self.weight_grads.collect(micro_batch_id):
            self._exec_backward_pass(buffer_id)  # type: ignore[attr-defined]
        if received is not None:  # the next RecvGrad writes into this buffer before our W runs
            buffers = [received] if isinstance(received, torch.Tensor) else list(received)
            self.weight_grads.detach_from(micro_batch_id, buffers)

    def _exec_backward_weight(self, micro_batch_id: int) -> None:
        e: Any = self
        assert self.weight_grads is not None
        # As DeepSpeed's backward for the bf16 optimizer: low-precision gradients are cleared before a
        # backward and added into the fp32 accumulators after it (each parameter gets its gradient in
        # either B or W, so every accumulator adds the same values in the same micro-batch order).
        bf16 = e.using_bf16_optimizer
        if bf16:
            e.optimizer.clear_lp_grads()
        self.weight_grads.run(micro_batch_id)
        if bf16:
            e.optimizer.update_hp_grads(clear_lp_grads=False)

    def _exec_schedule(self, pipe_schedule: Any) -> None:
        # As DeepSpeed's: reserve the buffers, then every instruction of every step in order; then
        # wait for this schedule's sends (see _exec_send_activations).
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())  # type: ignore[attr-defined]
        self.fwd_outputs = []
        self._pending_sends = []
        for step_cmds in pipe_schedule:
            for cmd in step_cmds:
                self._run_instruction(cmd)
        self._wait_sends()

    def _run_instruction(self, cmd: Any) -> None:
        method = self._INSTRUCTION_MAP.get(type(cmd))
        if method is None:
            raise RuntimeError(f"{self.__class__.__name__} does not understand instruction {cmd!r}")
        tracer = self.tracer
        if tracer is None or not tracer.active:
            method(self, **cmd.kwargs)
            return
        with tracer.span(type(cmd).__name__, cmd.kwargs.get("buffer_id", -1)):
            method(self, **cmd.kwargs)

    # --- sends that do not wait for the receiver ---------------------------------------------------
    # DeepSpeed sends activations and gradients with a blocking send: a stage that sends waits
    # until its peer posts the matching receive (gloo hands over a large tensor only then), so
    # each stage also waits on the other's progress, and a stage slowed by a busy machine stalls
    # both. Here the same tensors go out with ``isend``, in the same order to the same rank (the
    # receiver, DeepSpeed's blocking ``recv``, is unchanged): the sender moves on to its next
    # instruction; the sent tensors are never written again (a forward makes new outputs, a
    # gradient is freed with its input buffer) and every send is waited for before the schedule
    # ends. Cases DeepSpeed transforms before sending (partitioned tensors, boolean masks,
    # dynamic shapes, DeepSpeed's own timers) keep DeepSpeed's path.

    def _sends_async(self) -> bool:
        e: Any = self
        return not (
            e.dynamic_shape
            or e.has_attention_mask
            or e.has_bool_tensors
            or e.is_pipe_partitioned
            or e.is_grad_partitioned
            or e.wall_clock_breakdown()
        )

    def _isend(self, tensors: list[torch.Tensor], stage: int) -> None:
        import torch.distributed as dist

        dest = self.grid.stage_to_global(stage_id=stage)  # type: ignore[attr-defined]
        for t in tensors:
            self._pending_sends.append(dist.isend(t, dest))

    def _wait_sends(self) -> None:
        for work in self._pending_sends:
            work.wait()
        self._pending_sends = []

    def _exec_send_activations(self, buffer_id: int) -> None:
        e: Any = self
        if not self._sends_async():
            return super()._exec_send_activations(buffer_id)  # type: ignore[misc]
        outputs = e.pipe_buffers["outputs"][buffer_id]
        if e.first_output_send:  # shapes and dtypes, once (blocking, as DeepSpeed sends them)
            e.first_output_send = False
            e._send_tensor_meta(outputs, e.next_stage)
        self._isend([outputs] if isinstance(outputs, torch.Tensor) else list(outputs), e.next_stage)

    def _exec_send_grads(self, buffer_id: int) -> None:
        e: Any = self
        if not self._sends_async():
            return super()._exec_send_grads(buffer_id)  # type: ignore[misc]
        inputs = e.pipe_buffers["inputs"][buffer_id]
        if isinstance(inputs, torch.Tensor):
            grads = [inputs.grad]
        else:  # as DeepSpeed: integer side inputs (position ids) have no gradient and are not sent
            grads = [t.grad for t in inputs if t.is_floating_point()]
        if any(g is None for g in grads):
            raise RuntimeError(f"stage {e.stage_id}: an input of buffer {buffer_id} has no gradient to send")
        self._isend(grads, e.prev_stage)
        e.pipe_buffers["inputs"][buffer_id] = None  # as DeepSpeed: the input buffer is free now

    def _aggregate_total_loss(self) -> Any:
        tracer = self.tracer
        if tracer is None or not tracer.active:
            return super()._aggregate_total_loss()  # type: ignore[misc]
        with tracer.span("AggregateLoss"):
            return super()._aggregate_total_loss()  # type: ignore[misc]

    def trace(self, tracer: Tracer) -> None:
        """Record this engine's instructions, and its gradient-norm/clipping overrides, into ``tracer``."""
        self.tracer = tracer
        opt = getattr(self, "optimizer", None)
        if "scaled_global_norm" in getattr(opt, "__dict__", {}):  # pipefit's ZeRO-1 norm (run/engine.py)
            opt.scaled_global_norm = tracer.wrap(opt.scaled_global_norm, "GradNorm")  # type: ignore[union-attr]
        if "clip_fp32_gradients" in self.__dict__:  # pipefit's stage-0 global-norm clipping
            self.clip_fp32_gradients = tracer.wrap(self.clip_fp32_gradients, "GradNormClip")


@functools.cache
def engine_class() -> type:
    """``PipefitPipelineEngine``: the mixin over DeepSpeed's ``PipelineEngine`` (built once, on first use)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine  # heavy; plan and verify never import it

    # DeepSpeed's map holds its own functions: point each instruction at this class's override, if any.
    instructions = {
        kind: getattr(PipefitEngineMixin, fn.__name__, fn) for kind, fn in PipelineEngine._INSTRUCTION_MAP.items()
    }
    instructions[BackwardInput] = PipefitEngineMixin._exec_backward_input
    instructions[BackwardWeight] = PipefitEngineMixin._exec_backward_weight
    namespace = {"__module__": __name__, "_INSTRUCTION_MAP": instructions}
    return type("PipefitPipelineEngine", (PipefitEngineMixin, PipelineEngine), namespace)


def adopt(engine: Any) -> Any:
    """Make the engine ``deepspeed.initialize`` returned an instance of :func:`engine_class` (this instance only)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if type(engine) is not PipelineEngine:
        raise RuntimeError(
            f"expected DeepSpeed's PipelineEngine from deepspeed.initialize, got {type(engine).__name__}"
        )
    engine.__class__ = engine_class()
    return engine
