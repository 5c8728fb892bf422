"""Per-stage memory: the plan's prediction against an independent count of what a real engine holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipefit.config import RunConfig
from pipefit.config.compose import compose
from pipefit.config.validate import validate
from pipefit.partition.memory import DP1_BUCKET_ELEMENTS
from pipefit.partition.plan import predicted_stage_memory
from pipefit.run.ds_config import build_ds_config
from pipefit.run.preflight import Prepared
from pipefit.run.reporting import memory_baseline, optimizer_state_bytes, peak_memory

# Hidden 512, 2 blocks, vocab 8000: 13.8M parameters, of which the saved activations are ~1 %.
SHAPE = [
    "model=llama_tiny",
    "model.hf_config.hidden_size=512",
    "model.hf_config.intermediate_size=1376",
    "model.hf_config.num_hidden_layers=2",
    "model.hf_config.vocab_size=8000",
    "data.seq_len=32",
    "train.micro_batch_size=2",
    "train.grad_accum_steps=2",
    "pipeline.stages=1",
    "hardware=cpu",
]


def _live_peak(timeline: list) -> tuple[int, int]:
    """(bytes alive when the profile starts, peak bytes alive) of a ``torch.profiler`` memory timeline."""
    from torch.profiler._memory_profiler import Action

    live: dict = {}
    current = peak = 0
    start = None
    for _, action, (key, _), size in timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live[key] = size
            current += size
        elif action == Action.DESTROY:
            current -= live.pop(key, size)
        if start is None and action != Action.PREEXISTING:
            start = current
        peak = max(peak, current)
    return start or 0, peak


@pytest.mark.slow
def test_predicted_stage_memory_is_what_the_engine_holds_at_its_peak(tmp_path: Path) -> None:
    """fp32, ZeRO-1, dp=1, one stage, started as a run starts it (``start_engine``: dp=1 direct gradients,
    fp32 partition sharing the weights' storage): predicted bytes within 5 % of the peak of live tensors
    over a real ``train_batch`` (torch's memory profiler, every tensor created and destroyed), whose
    persistent part is counted from the engine's own storages (weights = fp32 partition, Adam moments:
    12 B/param)."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    from torch.profiler import ProfilerActivity, profile

    from pipefit.run.engine import build_stage, start_engine

    run = validate(compose([*SHAPE, f"output_dir={tmp_path / 'out'}"]))
    assert isinstance(run, RunConfig)
    prepared = Prepared(run, world_size=1)
    ds_cfg = build_ds_config(run, 1, "cpu", None)
    assert ds_cfg["zero_optimization"]["reduce_bucket_size"] == DP1_BUCKET_ELEMENTS  # capped at dp=1
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        deepspeed.init_distributed(
            dist_backend="gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
        )
        baseline = memory_baseline("cpu")
        topo = PipeDataParallelTopology(num_pp=1, num_dp=1)
        module = build_stage(run, prepared.skeleton, prepared.boundaries, topo, 0, "cpu")
        params = sum(p.numel() for p in module.parameters())
        engine, _ = start_engine(module, run, prepared.skeleton, ds_cfg, writer=True)
        engine.set_dataiterator(prepared.batches.iterate(0))
        engine.train_batch()  # the moments exist from here on
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*module.parameters(), *engine.optimizer.single_partition_of_fp32_groups]
        }
        held = sum(storages.values()) + optimizer_state_bytes(engine)
        assert held == 12 * params  # weights (the fp32 partition shares them), two moments
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            engine.train_batch()
        start, peak = _live_peak(p._memory_profile().timeline)
        resident = peak_memory("cpu", baseline)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert abs(start - held) < 0.05 * held  # the profile sees what the engine holds
    # Live tensors only: the default hardware adds no runtime or allocator bytes (the cpu preset does, for RSS).
    (predicted,) = predicted_stage_memory(prepared.skeleton, prepared.workload, [0, len(prepared.plan)], None)
    assert predicted == pytest.approx(peak, rel=0.05), (predicted / params, peak / params)
    # The resident set also keeps the allocator's free blocks: never below the live peak.
    assert resident >= 0.95 * peak
