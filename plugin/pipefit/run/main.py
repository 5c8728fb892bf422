"""The training run: prepare, build this rank's stage, load, train with ``engine.train_batch``, export.

Everything that can be wrong with the inputs is checked before a process group exists. Every
rank writes into one ``output_dir``; rank 0 writes ``config.yaml``, ``ds_config.json``,
``metrics.jsonl`` (one JSON line per optimizer step, appended; ``eval_loss``, ``eval_ppl`` and
``eval_tokens`` on evaluated steps; with ``train.trace``, one last line holding the ``trace``
breakdown), ``train.log``, with ``train.tensorboard`` ``tensorboard/`` and with ``train.trace``
``trace.json`` and ``trace.png``.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipefit.model import lora as trainable
from pipefit.model.layer_list import load_weights
from pipefit.partition import costs
from pipefit.partition.boundaries import boundaries_for, price_layers
from pipefit.run import checkpoint
from pipefit.run.ds_config import build_ds_config
from pipefit.run.engine import (
    build_stage,
    start_engine,
)
from pipefit.run.exits import InterruptFlag, end_rank, user_error_exit, user_error_types
from pipefit.run.export import export_run
from pipefit.run.logs import library_prints, quiet_console, setup_logging
from pipefit.run.loop import train_steps
from pipefit.run.preflight import Prepared, ensure_single_process_env, prepare
from pipefit.run.reporting import write_partition, write_run_files
from pipefit.run.watchdog import PeerWatchdog

log = logging.getLogger("pipefit")


def main(cfg: Any, overrides: list[str]) -> dict[str, Any]:
    """Recipe entry: prepare (all checks, no process group), then train. Bad input: one line, exit 2.

    Later failures: one line naming the rank (exit 1); a lost peer: one line from the watchdog
    (exit 3); Ctrl-C: one line saying where to resume (exit 130).
    """
    quiet_console(int(os.environ.get("RANK", "0")))
    try:
        ensure_single_process_env()
        prepared = prepare(cfg, overrides)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("pipefit: interrupted before training started", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except user_error_types() as exc:
        user_error_exit(str(exc))
    return train(prepared)


def train(prepared: Prepared) -> dict[str, Any]:
    """Run training on this rank; returns a summary (losses per step) on every rank."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    run = prepared.run
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    output_dir = Path(run.output_dir)
    setup_logging(output_dir, rank)
    accel = get_accelerator()
    device_kind = accel.device_name()
    backend = "gloo" if device_kind == "cpu" else accel.communication_backend_name()
    topo = PipeDataParallelTopology(num_pp=run.pipeline.stages, num_dp=prepared.dp)

    def describe(r: int) -> str:
        coord = topo.get_coord(r)
        return f"rank {r} (stage {coord.pipe}, data {coord.data})"

    watchdog = None
    interrupts = InterruptFlag()
    try:
        with interrupts:
            with library_prints():
                deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=run.train.dist_timeout_s))
            if run.train.heartbeat_timeout_s > 0 and world > 1:
                watchdog = PeerWatchdog(
                    rank,
                    world,
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    run.train.heartbeat_interval_s,
                    run.train.heartbeat_timeout_s,
                    describe,
                ).start()
            return _train_on_rank(prepared, rank, output_dir, accel, device_kind, topo)
    except (Exception, KeyboardInterrupt) as exc:
        code = end_rank(exc, interrupts.seen, watchdog, run, rank, describe(rank))
        raise SystemExit(code) from None
    finally:
        if watchdog is not None:
            watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train_on_rank(
    prepared: Prepared, rank: int, output_dir: Path, accel: Any, device_kind: str, topo: Any
) -> dict[str, Any]:
    """This rank's part of the run, with its process group up: build, load, train, export."""
    import torch.distributed as dist  # with deepspeed: imported by the ranks, never by plan or verify

    run = prepared.run
    if device_kind != "cpu":
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = accel.current_device_name() if device_kind != "cpu" else "cpu"
    if prepared.deferred_profile:
        _profile_partition(prepared, rank, device)
    with library_prints():  # DeepSpeed's PipelineModule printouts (SEED_LAYERS=, topology): train.log only
        module = build_stage(run, prepared.skeleton, prepared.boundaries, topo, rank, device)
    if run.model.path:
        load_weights(module, prepared.skeleton, run.model.path)
    measured = prepared.boundaries if prepared.deferred_profile else None
    trainable.apply(module, run, prepared.skeleton, measured)  # train.freeze / lora, before the optimizer
    ds_cfg = build_ds_config(run, prepared.dp, device_kind, prepared.base_ds_config)
    if rank == 0:
        write_run_files(prepared, output_dir, ds_cfg)
    with library_prints():  # deepspeed.initialize's and a resume's printouts (optimizer, op builds)
        engine, kept = start_engine(module, run, prepared.skeleton, ds_cfg, writer=topo.get_coord(rank).data == 0)
        start = checkpoint.resume(engine, prepared.resume_from, prepared.resume_same_shape, rank)
    losses, last = train_steps(engine, prepared, output_dir, rank, start)
    write_partition(engine, prepared, output_dir, rank, topo.get_coord(rank).pipe)
    if last < run.train.max_steps:
        if rank == 0:
            log.info("stopping after step %d (train.stop_after_steps); resume with train.resume=auto", last)
        return {"losses": losses, "boundaries": prepared.boundaries, "stage": engine.stage_id, "last_step": last}
    if run.train.export:
        export_run(engine, prepared, output_dir, kept, rank)
    dist.barrier()
    return {"losses": losses, "boundaries": prepared.boundaries, "stage": engine.stage_id}


def _profile_partition(prepared: Prepared, rank: int, device: str) -> None:
    """``pipeline.partition=profile``: rank 0 times each distinct layer here, every rank gets the
    same figures (so the same boundaries); results are cached per (config, shape, dtype, device)."""
    import torch.distributed as dist

    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    run = prepared.run
    hw = costs.Hardware.from_config(run.hardware)
    layer_costs = price_layers(
        prepared.skeleton, "profile", prepared.workload, hw, device, measure=rank == 0, broadcast=broadcast
    )
    prepared.boundaries = boundaries_for(
        prepared.skeleton,
        "profile",
        run.pipeline.stages,
        None,
        layer_costs=layer_costs,
        trainable=prepared.trainable_layers,
    )
    if prepared.resume_from is not None:
        state = checkpoint.read_state(prepared.resume_from)
        prepared.resume_same_shape = checkpoint.same_shape(state, prepared.boundaries, run.pipeline.stages, prepared.dp)
