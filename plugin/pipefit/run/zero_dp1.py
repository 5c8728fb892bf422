"""ZeRO-1 at one data-parallel rank: hand the gradients to the optimizer step without reducing them.

With a data-parallel group of one, DeepSpeed's ZeRO-1 ``reduce_gradients(pipeline_parallel=True)``
still allocates a reduction bucket (``reduce_bucket_size`` elements) every step, copies every
gradient into it, "reduces" it over the group of one (scaling by 1), copies it again into a
persistent flat ``grads_in_partition`` buffer, and only then lists those copies as
``averaged_gradients`` for ``step``, which flattens them a third time. Every copy holds the same
bits as the gradient it came from, so at dp=1 :func:`install_dp1_direct_gradients` replaces
``reduce_gradients`` on this optimizer instance with what the end of DeepSpeed's reduction leaves
behind, built from the gradients themselves: ``averaged_gradients[i]`` as
``get_flat_partition(..., return_tensor_list=True)`` lists them (the partition is the whole group),
``param.grad`` cleared, the epilogue flag set. ``step`` (norm, clipping, AdamW, the copy back into
the model's weights) is DeepSpeed's, unchanged, over bit-identical inputs; losses, weights, the
optimizer state and the reported gradient norm are the same to the bit
(tests/run/test_zero_dp1.py). The all-gather after the step is already skipped by DeepSpeed at dp=1;
under fp32 the copy of the updated partition into the model's weights is made a no-op too
(:func:`share_fp32_masters`).

Only the plain configuration is taken over: no CPU offload, no overlapped communication, no
separate gradient-accumulation dtype (bf16 with fp32 accumulation keeps DeepSpeed's path), no
``grad_accum`` attribute, no MoE, Muon or ZenFlow, and a communication dtype equal to the
parameters'. Anything else keeps DeepSpeed's ``reduce_gradients``.

Private DeepSpeed API read (pinned in pyproject.toml; tests/run/test_zero_dp1.py checks the names
and the source lines this relies on): ``dp_process_group``, ``bit16_groups``,
``params_in_partition``, ``first_offset``, ``partition_size``, ``averaged_gradients``,
``all_grad_tensors``, ``get_all_grad_tensors``, ``get_flat_partition``,
``_clear_param_grad_only``, ``_epilogue_ran_this_backward``, ``gradient_accumulation_dtype``,
``use_grad_accum_attribute``, ``overlap_comm``, ``cpu_offload``, ``has_moe_layers``, ``zenflow``,
``communication_data_type``, ``_is_muon_group``; for :func:`share_fp32_masters`
``single_partition_of_fp32_groups``, ``parallel_partitioned_bit16_groups``, ``_link_all_hp_params``.
"""

from __future__ import annotations

from typing import Any

import torch

# What the optimizer must look like for the direct path (attribute -> required value).
_PLAIN = {
    "cpu_offload": False,
    "overlap_comm": False,
    "use_grad_accum_attribute": False,
    "has_moe_layers": False,
    "zenflow": False,
    "partition_gradients": False,
}


def dp1_direct_eligible(opt: Any) -> str | None:
    """Why ``opt`` keeps DeepSpeed's reduction (a short reason), or None when the direct path applies."""
    import torch.distributed as dist

    if type(opt).__name__ != "DeepSpeedZeroOptimizer":
        return f"optimizer is {type(opt).__name__}"
    for name, want in _PLAIN.items():
        if getattr(opt, name, None) != want:
            return f"{name}={getattr(opt, name, None)!r}"
    if dist.get_world_size(group=opt.dp_process_group) != 1:
        return "data-parallel group of more than one rank"
    if opt.gradient_accumulation_dtype != opt.dtype:
        return f"gradients accumulated in {opt.gradient_accumulation_dtype}, parameters in {opt.dtype}"
    comm = getattr(opt, "communication_data_type", None)
    if comm is not None and comm != opt.dtype:
        return f"communication dtype {comm}, parameters in {opt.dtype}"
    if any(len(g) and opt._is_muon_group(g) for g in opt.params_in_partition):
        return "Muon parameter group"
    from deepspeed.runtime.torch_autocast import is_autocast_initialized

    if is_autocast_initialized():
        return "torch autocast (a communication dtype per parameter)"
    return None


def direct_reduce_gradients(opt: Any, pipeline_parallel: bool = False) -> None:
    """DeepSpeed's ZeRO-1 ``reduce_gradients`` at dp=1, without the bucket and the two copies.

    Leaves what ``independent_gradient_partition_epilogue`` leaves at a boundary: the listed
    gradients are the parameters' own (made contiguous, as the bucket copy made them, so the
    norm reduces in the same order), zeros where a parameter has none.
    """
    del pipeline_parallel  # the bucket it asks for is what this path does without
    device = opt.device
    for i in range(len(opt.bit16_groups)):
        params = opt.params_in_partition[i]
        grads = opt.get_all_grad_tensors(params, dtype=opt.gradient_accumulation_dtype)
        opt.all_grad_tensors[i] = [g if g.is_contiguous() else g.contiguous() for g in grads]
        opt.averaged_gradients[i] = opt.get_flat_partition(
            params,
            opt.first_offset[i],
            opt.partition_size[i],
            dtype=opt.gradient_accumulation_dtype,
            device=device,
            param_group_idx=i,
            return_tensor_list=True,
        )
        opt.all_grad_tensors[i] = None
    opt._clear_param_grad_only()
    opt._epilogue_ran_this_backward = True


def share_fp32_masters(opt: Any) -> bool:
    """fp32 at dp=1: the optimizer's flat fp32 partition becomes the model's own flat weights.

    DeepSpeed keeps the fp32 "master" partition as a separate copy even when the model is fp32 and
    the partition is the whole group; after every AdamW step it copies the partition into the
    model's flat weights. Made one storage (only where the two hold the same bits), that copy is a
    copy of a tensor onto itself, which torch skips; the values are the same either way, and should
    anything later give the partition other storage, DeepSpeed's copy in ``step`` keeps the model
    right. The links from parameters to their fp32 fragments are rebuilt on the shared storage.
    """
    pairs = list(zip(opt.single_partition_of_fp32_groups, opt.parallel_partitioned_bit16_groups, strict=True))
    for master, partitions in pairs:
        model = partitions[0]
        if len(partitions) != 1 or master.dtype != torch.float32 or model.dtype != torch.float32:
            return False
        if master.shape != model.shape or not torch.equal(master, model):
            return False
    for master, partitions in pairs:
        master.data = partitions[0].data
    opt._link_all_hp_params()
    return True


def install_dp1_direct_gradients(engine: Any) -> bool:
    """At dp=1 under ZeRO-1, replace ``reduce_gradients`` on ``engine.optimizer`` (this instance only);
    under fp32, also share the fp32 partition with the model's weights (:func:`share_fp32_masters`).

    Returns whether it was installed (see :func:`dp1_direct_eligible` for when it is not).
    """
    opt = engine.optimizer
    if dp1_direct_eligible(opt) is not None:
        return False
    share_fp32_masters(opt)

    def reduce_gradients(pipeline_parallel: bool = False) -> None:
        with torch.no_grad():
            direct_reduce_gradients(opt, pipeline_parallel)

    opt.reduce_gradients = reduce_gradients
    return True
