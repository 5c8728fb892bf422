"""The memory model: the bytes each pipeline stage holds at its peak, as DeepSpeed really allocates them.

A stage's peak (:class:`pipefit.partition.balance.StageMemory`) is

- per trainable parameter, the state DeepSpeed holds at the optimizer step (:func:`state_bytes_per_param`);
- per micro-batch in flight, the activations its layers save for backward (priced by the cost model);
- the part of ZeRO's gradient-reduction bucket the stage's gradients fill: ``reduce_bucket_size``
  elements of the gradient dtype, allocated on every step by ``DeepSpeedZeroOptimizer.reduce_gradients``
  for pipelines (capped at dp=1, where there is nothing to reduce: :func:`reduce_bucket_elements`).

Measured peaks (``partition.json``, ``benchmarks/memory.py``) are the rank's peak resident set above the
interpreter-and-libraries baseline on CPU, and ``torch.cuda.max_memory_allocated`` on an accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipefit.partition.balance import StageMemory

__all__ = ["DTYPE_BYTES", "memory_model", "reduce_bucket_elements", "state_bytes_per_param"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def state_bytes_per_param(precision: str, zero_stage: int, dp: int) -> float:
    """Bytes DeepSpeed 0.19 holds per trainable parameter at the optimizer step (gradients still held).

    Which optimizer wrapper DeepSpeed picks (``DeepSpeedEngine._do_optimizer_sanity_check``, as a
    pipeline) and what it holds; ``w`` = 2 (bf16/fp16) or 4 (fp32) bytes for the weight and again
    for its accumulated gradient:

    - fp32, ZeRO-0: torch's AdamW on the weights: ``w + w + 8`` (two fp32 moments);
    - fp32, ZeRO-1: ``DeepSpeedZeroOptimizer``: ``w + w`` plus, sharded over dp, ``20 / dp``: at the
      accumulation boundary ``get_flat_partition`` copies the accumulated gradients of this rank's
      partition (4), ``step`` flattens that copy into one more tensor (4) before the first is freed, and
      the fp32 master partition (cloned even in fp32, 4) and the two moments (8) are held throughout;
      measured (peak resident set, one rank, dp=1, 42-117M parameters): 31-36 B/param against 28 here,
      the rest being the allocator's retained free blocks and the runtime (about 80 MiB);
      at dp=1 pipefit hands the gradients to ``step`` without that copy and the fp32 partition shares the
      weights' storage (``pipefit.run.zero_dp1``): ``w + w + 16``, the flattened gradients (4), the moments
      (8) and AdamW's full-size temporary (4: the partition is one tensor); measured with torch's memory
      profiler through ``start_engine`` (``tests/run/test_memory.py``): 24.4 B/param at the peak;
    - fp16, ZeRO-1: ``w + w`` plus the fp32 master, its fp32 gradient partition and the moments:
      ``16 / dp``;
    - fp16, ZeRO-0: ``FP16_Optimizer`` (``FP16_UnfusedOptimizer`` with torch's AdamW): unsharded
      fp32 masters, their fp32 gradients, moments: ``+ 16``;
    - bf16 (ZeRO-0 and 1): ``BF16_Optimizer``: the full, unsharded gradient accumulation buffer in
      the accumulation dtype (fp32 under ZeRO-1, bf16 under ZeRO-0: see ``ds_config.build_ds_config``)
      and, sharded over dp at either stage, fp32 masters and moments: ``12 / dp``.
    """
    w = DTYPE_BYTES[precision]
    if precision == "bf16":
        accumulation = 4 if zero_stage >= 1 else 2
        return w + w + accumulation + 12 / dp
    if zero_stage >= 1 and precision == "fp32" and dp == 1:
        return w + w + 16  # pipefit.run.zero_dp1: no partition copy, the master is the weights
    if zero_stage >= 1:
        return w + w + (20 if precision == "fp32" else 16) / dp
    return w + w + (8 if precision == "fp32" else 16)


# At dp=1 there is nothing to reduce, yet DeepSpeed allocates a fresh reduce_bucket_size-element bucket on
# every pipeline step and copies the gradients through it; pipefit caps both buckets at this many elements
# there (see pipefit.run.ds_config.build_ds_config): a 50M-element bucket grew a rank's resident set by
# ~80 MiB a step (91M parameters, fp32), this one by nothing.
DP1_BUCKET_ELEMENTS = 1_000_000


def reduce_bucket_elements(configured: int, dp: int) -> int:
    """The ``reduce_bucket_size`` DeepSpeed is given: the configured one, capped at dp=1."""
    return min(int(configured), DP1_BUCKET_ELEMENTS) if dp == 1 else int(configured)


def memory_model(plan: Sequence[Any], workload: Any, activation: Sequence[float], hw: Any = None) -> StageMemory:
    """The :class:`StageMemory` of a layer list under ``workload`` (a :class:`pipefit.partition.costs.Workload`).

    ZeRO-1 (not bf16, whose ``BF16_Optimizer`` keeps its own flat gradient buffer) copies each stage's
    gradients through a reduction bucket of ``reduce_bucket_size`` elements; the part the gradients fill,
    ``min(bucket, stage parameters)`` elements, is what the stage holds (an untouched CPU page is never
    resident).

    ``hw`` (a :class:`pipefit.config.HardwareConfig`) adds what its measure of memory holds beyond live
    tensors: ``runtime_memory_gib`` per stage and ``allocator_bytes_per_param``. On CPU the peak resident
    set keeps glibc's free blocks (tensors under its 32 MiB mmap threshold return to the heap, not the
    system), most of them left by ZeRO's per-parameter gradient copies of the rank's partition: measured
    ~7 B per parameter above the live peak at 42M-542M parameters, fp32 ZeRO-1, dp=1; divided over dp.
    """
    per_param = state_bytes_per_param(workload.precision, workload.zero_stage, workload.dp)
    per_param += float(getattr(hw, "allocator_bytes_per_param", 0.0) or 0.0) / workload.dp
    bucketed = workload.zero_stage >= 1 and workload.precision != "bf16"
    return StageMemory(
        static=[layer.num_params * per_param for layer in plan],
        activation=list(activation),
        micro_batches=workload.micro_batches,
        fixed=float(getattr(hw, "runtime_memory_gib", 0.0) or 0.0) * 2**30,
        params=[float(layer.num_params) for layer in plan],
        bucket_elements=float(reduce_bucket_elements(workload.reduce_bucket_size, workload.dp)) if bucketed else 0.0,
        bucket_bytes=float(DTYPE_BYTES[workload.precision]),
    )
