"""pipefit's ``PipelineEngine``: DeepSpeed's, with each schedule instruction run through one hook.

``deepspeed.initialize`` builds a plain ``deepspeed.runtime.pipe.engine.PipelineEngine`` for a
``PipelineModule``; :func:`adopt` turns that one instance into :func:`engine_class` (its
``__class__`` set, nothing patched globally). The subclass changes what DeepSpeed does per step
only where the result is the same to the bit:

- ``_exec_schedule`` runs each instruction through :meth:`PipefitEngineMixin._run_instruction`,
  the one place a tracer (``train.trace``) or another schedule's instructions can hook in;
- ``_aggregate_total_loss`` is traced as ``AggregateLoss`` (the last stage's loss broadcast).

Private DeepSpeed API used (pinned in pyproject.toml, checked by tests/run/test_pipe_engine.py):
``_exec_schedule``, ``_INSTRUCTION_MAP``, ``_reserve_pipe_buffers``, ``fwd_outputs``,
``_aggregate_total_loss``.
"""

from __future__ import annotations

import functools
from typing import Any

from pipefit.run.trace import Tracer


class PipefitEngineMixin:
    """The overrides; combined with DeepSpeed's ``PipelineEngine`` by :func:`engine_class`."""

    tracer: Tracer | None = None
    _INSTRUCTION_MAP: dict[type, Any]

    def _exec_schedule(self, pipe_schedule: Any) -> None:
        # As DeepSpeed's: reserve the buffers, then every instruction of every step in order.
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())  # type: ignore[attr-defined]
        self.fwd_outputs = []
        for step_cmds in pipe_schedule:
            for cmd in step_cmds:
                self._run_instruction(cmd)

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

    return type("PipefitPipelineEngine", (PipefitEngineMixin, PipelineEngine), {"__module__": __name__})


def adopt(engine: Any) -> Any:
    """Make the engine ``deepspeed.initialize`` returned an instance of :func:`engine_class` (this instance only)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if type(engine) is not PipelineEngine:
        raise RuntimeError(
            f"expected DeepSpeed's PipelineEngine from deepspeed.initialize, got {type(engine).__name__}"
        )
    engine.__class__ = engine_class()
    return engine
