"""The engine: this rank's ``PipelineModule`` with pipefit's boundaries, started by ``deepspeed.initialize``.

DeepSpeed is extended per engine (its module class, the engine's class: pipefit.run.pipe_engine,
two of its methods, ZeRO-1's reduction at dp=1: pipefit.run.zero_dp1), never patched globally.
"""

from __future__ import annotations

from typing import Any

import torch

from pipefit.config import RunConfig
from pipefit.model.layer_list import layer_specs
from pipefit.model.layers import ModelSkeleton, causal_lm_loss
from pipefit.run.checkpoint import SafeTorchCheckpointEngine
from pipefit.run.pipe_engine import adopt
from pipefit.run.precision import FrozenFromFolder, KeptValues, restore_fp32_masters, rounded_by_cast
from pipefit.run.schedule import scheduler_factory, weight_decay_groups
from pipefit.run.zero_dp1 import install_dp1_direct_gradients


def build_pipeline_module(
    skeleton: ModelSkeleton,
    boundaries: list[int],
    topology: Any,
    device: str = "cpu",
    activation_checkpoint_interval: int = 0,
) -> Any:
    """This rank's ``PipelineModule`` with exactly ``boundaries`` as its stage split."""
    from deepspeed.pipe import PipelineModule  # deepspeed: heavy; plan and verify never import it

    class FixedPartitionPipelineModule(PipelineModule):
        # DeepSpeed only knows named partition methods; pipefit computes boundaries itself
        # (validated, and without building every layer on every rank) and installs them here.
        # _partition_layers/_set_bounds are private DeepSpeed API: the version range is pinned
        # in pyproject.toml and tests/test_pipeline_distributed.py checks the resulting bounds.
        def _partition_layers(self, method: str = "uniform") -> None:
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = list(boundaries)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return FixedPartitionPipelineModule(
        layers=layer_specs(skeleton, device),
        topology=topology,
        loss_fn=causal_lm_loss,
        partition_method="pipefit",
        activation_checkpoint_interval=activation_checkpoint_interval,
    )


def install_single_collective_grad_norm(engine: Any) -> None:
    """ZeRO-1: compute the gradient norm over all parameter groups with one set of collectives.

    DeepSpeed's ZeRO-1 optimizer reduces the norm across pipeline stages once per parameter group,
    so stages with different numbers of groups (an embedding-only stage has no bias or norm
    weights, hence no no-decay group) wait on different collectives and deadlock at the first
    step. The norm is the same L2 norm over the same gradients; only the collectives change. This
    replaces ``scaled_global_norm`` on this engine's optimizer instance only.
    """
    opt = engine.optimizer
    if getattr(opt, "cpu_offload", False) or not hasattr(opt, "get_grad_norm_direct"):
        return

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        grads = [g for i in range(len(opt.bit16_groups)) for g in opt.averaged_gradients[i]]
        params = [p for i in range(len(opt.bit16_groups)) for p in opt.params_in_partition[i]]
        return opt.get_grad_norm_direct(grads, params, norm_type)

    opt.scaled_global_norm = scaled_global_norm


def install_global_norm_clipping(engine: Any) -> None:
    """Clip by the norm of the whole model's gradient (as one process would) under ZeRO stage 0.

    DeepSpeed's stage-0 fp32 path clips each pipeline stage by a norm that does not cover the
    other stages (its model-parallel reduction counts only stage 0 for non-tensor-parallel
    parameters), so clipped updates differ from ordinary training. ZeRO-1's optimizer computes
    the global norm correctly and is left alone. This replaces the engine's
    ``clip_fp32_gradients`` on this engine instance only.
    """
    import torch.distributed as dist

    group = engine.grid.get_pipe_parallel_group()
    max_norm = float(engine.gradient_clipping())

    def clip_fp32_gradients() -> None:
        grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
        # Tied copies on non-owner stages hold the same (all-reduced) gradient: count it once.
        owned = [
            p.grad.detach()
            for p in engine.module.parameters()
            if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
        ]
        # As torch.nn.utils.clip_grad_norm_: one fused norm per gradient, no copies; on the engine's
        # device even for a stage without gradients (the collective needs it there).
        sq = torch.zeros(1, dtype=torch.float32, device=engine.device)
        if owned:
            sq += torch.stack(torch._foreach_norm(owned, 2)).float().pow(2).sum()
        dist.all_reduce(sq, group=group)
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_fp32_gradients


def build_stage(
    run: RunConfig, skeleton: ModelSkeleton, boundaries: list[int], topo: Any, rank: int, device: str
) -> Any:
    """This rank's ``PipelineModule`` (only its own layers materialised), checked to hold exactly its layers."""
    torch.manual_seed(run.train.seed)
    module = build_pipeline_module(skeleton, boundaries, topo, device, run.pipeline.activation_checkpoint_interval)
    stage_id = topo.get_coord(rank).pipe
    local = (module._local_start, module._local_stop)
    wanted = (boundaries[stage_id], boundaries[stage_id + 1])
    if local != wanted:  # guards the private DeepSpeed hook in build_pipeline_module
        raise RuntimeError(f"stage {stage_id} holds layers {local}, expected {wanted}; DeepSpeed version unsupported")
    return module


def start_engine(
    module: Any, run: RunConfig, skeleton: ModelSkeleton, ds_cfg: dict[str, Any], writer: bool
) -> tuple[Any, KeptValues]:
    """``deepspeed.initialize`` over the loaded stage, with exact fp32 masters and pipefit's overrides.

    ``writer``: this rank is the data-parallel rank that exports its stage, and keeps what the export
    needs (:class:`KeptValues`).
    """
    import deepspeed  # heavy; plan and verify never need it

    from_folder = None
    if run.train.precision != "fp32" and writer and run.model.path:
        from_folder = FrozenFromFolder(module, skeleton, run.model.path)
    loaded = rounded_by_cast(module, run.train.precision, writer, from_folder)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        config=ds_cfg,
        model_parameters=weight_decay_groups(list(module.named_parameters()), run.optim.weight_decay),
        lr_scheduler=scheduler_factory(run.optim, run.train.max_steps),
    )
    adopt(engine)  # pipefit's PipelineEngine subclass, on this instance (see pipefit.run.pipe_engine)
    engine.use_schedule(run.pipeline.schedule)
    restore_fp32_masters(engine, loaded)
    # Frozen parameters have no fp32 master: keep their loaded values for an exact export.
    frozen_fp32 = {id(p): loaded[n] for n, p in engine.module.named_parameters() if n in loaded and not p.requires_grad}
    del loaded
    if run.zero.stage == 0 and run.optim.grad_clip > 0:
        install_global_norm_clipping(engine)
    if run.zero.stage == 1:
        install_single_collective_grad_norm(engine)
        install_dp1_direct_gradients(engine)  # dp=1: no reduction bucket, no copies (same bits)
    engine.checkpoint_engine = SafeTorchCheckpointEngine()
    return engine, KeptValues(frozen_fp32, from_folder)
