"""What a run reports: per-step metrics (console, ``metrics.jsonl``, tensorboard) and ``partition.json``."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from pipefit.config import RunConfig
from pipefit.partition.plan import predicted_stage_memory
from pipefit.run.logs import write_atomic
from pipefit.run.preflight import Prepared
from pipefit.run.trace import KINDS, Tracer, breakdown_record, format_breakdown, gather_and_write, per_instruction

log = logging.getLogger("pipefit")


def keep_history_until(metrics_path: Path, first: int) -> None:
    """Drop the records of steps after ``first`` from ``metrics.jsonl`` (atomically), before a launch
    that starts at step ``first + 1`` appends its own: a rerun from scratch (``first=0``) or a resume
    from an earlier checkpoint than the last logged step leaves one history, each step once."""
    if not metrics_path.is_file():
        return
    lines = metrics_path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        if step <= first:
            kept.append(line)
    if len(kept) != len(lines):
        write_atomic(metrics_path, "".join(f"{line}\n" for line in kept))


def optimizer_state_bytes(engine: Any) -> int:
    """Bytes of optimizer state (e.g. Adam moments) this rank holds; ZeRO-1 shards it over dp."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def memory_baseline(device_kind: str) -> int:
    """Bytes this rank holds before its stage is built: the interpreter and libraries (resident set) on
    CPU; on an accelerator 0, and its peak counter restarts here. Call before building the stage."""
    if device_kind == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * int(Path("/proc/self/statm").read_text().split()[1])
    torch.cuda.reset_peak_memory_stats()
    return 0


def peak_memory(device_kind: str, baseline: int) -> int:
    """This rank's peak memory above ``baseline``: peak resident set (``ru_maxrss``, KiB on Linux) on CPU,
    ``torch.cuda.max_memory_allocated`` on an accelerator."""
    if device_kind == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return int(torch.cuda.max_memory_allocated()) - baseline


def write_partition(
    engine: Any,
    prepared: Prepared,
    output_dir: Path,
    rank: int,
    stage_id: int,
    memory: tuple[int, int] | None = None,
) -> None:
    """Rank 0 writes ``partition.json``: boundaries, and what each rank built and holds.

    Per rank: its stage and data-parallel index, its layer range, its parameter count, the bytes of
    optimizer state it holds after training (ZeRO-1 divides these by the dp degree) and, with
    ``memory`` = (measured peak above the baseline, baseline), its peak memory next to the plan's
    prediction for its stage (:func:`pipefit.partition.plan.predicted_stage_memory`), also logged.
    """
    import torch.distributed as dist

    module = engine.module
    built = {
        "rank": rank,
        "stage": stage_id,
        "data": engine.grid.get_data_parallel_rank(),
        "layers": [module._local_start, module._local_stop],
        "params": sum(p.numel() for p in module.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(engine),
        "param_dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
    }
    if memory is not None:
        predicted = predicted_stage_memory(
            prepared.skeleton, prepared.workload, prepared.boundaries, prepared.run.hardware
        )
        built.update(
            peak_memory_bytes=memory[0], baseline_memory_bytes=memory[1], predicted_memory_bytes=predicted[stage_id]
        )
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, built)
    if rank == 0:
        record = {
            "method": prepared.run.pipeline.partition,
            "boundaries": prepared.boundaries,
            "zero_stage": prepared.run.zero.stage,
            "data_parallel": prepared.dp,
            "layers": [{"index": x.index, "kind": x.kind, "params": x.num_params} for x in prepared.plan],
            "ranks": gathered,
        }
        if prepared.auto_layout is not None:
            record["auto_layout"] = prepared.auto_layout  # what the layout search chose, and its prediction
        write_atomic(output_dir / "partition.json", json.dumps(record, indent=2))
        if memory is not None:
            log_peak_memory(gathered)


def log_peak_memory(gathered: list[dict[str, Any]]) -> None:
    """One console line: each stage's measured peak (its largest replica) against the plan's prediction;
    every rank's figures go to ``train.log`` (and ``partition.json``)."""
    worst: dict[int, dict[str, Any]] = {}
    for r in gathered:
        log.debug(
            "rank %d (stage %d): peak memory %.3f GiB above a %.3f GiB baseline; plan predicted %.3f GiB",
            r["rank"],
            r["stage"],
            r["peak_memory_bytes"] / 2**30,
            r["baseline_memory_bytes"] / 2**30,
            r["predicted_memory_bytes"] / 2**30,
        )
        if r["stage"] not in worst or r["peak_memory_bytes"] > worst[r["stage"]]["peak_memory_bytes"]:
            worst[r["stage"]] = r
    log.info(
        "peak memory per stage, measured (plan's prediction), GiB above the runtime: %s",
        ", ".join(
            f"stage {s} {r['peak_memory_bytes'] / 2**30:.3f} ({r['predicted_memory_bytes'] / 2**30:.3f})"
            for s, r in sorted(worst.items())
        ),
    )


def log_plan(prepared: Prepared) -> None:
    b = prepared.boundaries
    chosen = prepared.auto_layout
    if chosen is not None:
        log.info(
            "layout search (%s) over %d layouts for %d ranks: pp=%d dp=%d micro_batch_size=%d grad_accum_steps=%d "
            "activation_checkpoint_interval=%d zero.stage=%d, predicted step %.4g s (%.4g tokens/s), peak stage "
            "memory %.2f GiB; repeat it with these values and pipeline.partition=manual pipeline.boundaries=%s",
            ", ".join(f"{name}=auto" for name in chosen["auto"]),
            chosen["candidates"],
            chosen["world"],
            chosen["pp"],
            chosen["dp"],
            chosen["micro_batch_size"],
            chosen["grad_accum_steps"],
            chosen["activation_checkpoint_interval"],
            chosen["zero_stage"],
            chosen["predicted_step_s"],
            chosen["tokens_per_s"],
            chosen["peak_memory_bytes"] / 2**30,
            list(chosen["boundaries"]),
        )
    log.info("partition=%s: boundaries %s", prepared.run.pipeline.partition, b)
    for s in range(len(b) - 1):
        layers = prepared.plan[b[s] : b[s + 1]]
        kinds = ", ".join(f"{x.index}:{x.kind}" for x in layers)
        log.info(
            "stage %d: layers [%d, %d) params %d (%s)", s, b[s], b[s + 1], sum(x.num_params for x in layers), kinds
        )


class _Reporter:
    """What a step reports besides ``metrics.jsonl`` and the log: rank 0's tqdm bar and TensorBoard events.

    With ``train.tensorboard`` every rank takes part in gathering the per-rank ``train_batch`` wall
    times (one small all-gather a step); only rank 0 writes.
    """

    def __init__(self, engine: Any, run: RunConfig, output_dir: Path, rank: int, first: int) -> None:
        t = run.train
        self.engine = engine
        self.gather = t.tensorboard
        self.run = run
        self.rank = rank
        self.bar: Any = None
        self.writer: Any = None
        if rank != 0:
            return
        keep_history_until(output_dir / "metrics.jsonl", first)
        if t.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=t.max_steps, initial=first, unit="step", dynamic_ncols=True, file=sys.stderr)
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Like metrics.jsonl: what an earlier launch logged beyond the step this one starts from goes.
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=first + 1)

    def stage_times(self, seconds: float) -> dict[int, float]:
        """Each stage's ``train_batch`` wall time (its slowest data-parallel replica). Collective."""
        import torch.distributed as dist

        if not self.gather:
            return {}
        mine = torch.tensor([float(self.engine.stage_id), seconds], dtype=torch.float64, device=self.engine.device)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        out: dict[int, float] = {}
        for stage, sec in (x.tolist() for x in every):
            out[int(stage)] = max(out.get(int(stage), 0.0), sec)
        return out

    def step(self, record: dict[str, Any], stage_times: dict[int, float]) -> None:
        step = record["step"]
        if self.bar is not None:
            shown = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s'] or 0:.0f}"}
            if "eval_loss" in record:
                shown["eval"] = f"{record['eval_loss']:.4f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        if self.writer is not None:
            for key, tag in (
                ("loss", "train/loss"),
                ("lr", "train/lr"),
                ("grad_norm", "train/grad_norm"),
                ("tokens_per_s", "train/tokens_per_s"),
                ("step_time_s", "train/step_time_s"),
                ("eval_loss", "eval/loss"),
                ("eval_ppl", "eval/ppl"),
            ):
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], step)
            for stage, sec in stage_times.items():
                self.writer.add_scalar(f"stage_step_time_s/stage{stage}", sec, step)

    def trace(self, tracer: Tracer, output_dir: Path, step: int) -> None:
        """``train.trace``: gather every rank's spans; rank 0 writes the trace files and reports the
        per-stage breakdown (log, one ``metrics.jsonl`` line with ``trace``, TensorBoard). Collective."""
        run = self.run
        folder = Path(run.train.trace_dir).expanduser() if run.train.trace_dir else output_dir
        title = f"{run.model.name} boundaries {list(getattr(self.engine.module, 'parts', []))}"
        table, records = gather_and_write(tracer, self.engine, self.rank, folder, title)
        if self.rank != 0:
            return
        for line in format_breakdown(table):
            log.info("%s", line)
        log.info("trace: wrote %s", folder / "trace.json")
        record = {"step": step, **breakdown_record(table, per_instruction(records))}
        with (output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for stage, row in table.items():
                for kind in (*KINDS, "step_s"):
                    self.writer.add_scalar(f"trace/stage{stage}/{kind}", row[kind], step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def write_run_files(prepared: Prepared, output_dir: Path, ds_cfg: dict[str, Any]) -> None:
    """Rank 0: ``config.yaml`` (the validated config) and ``ds_config.json``, then the plan in the log."""
    run = prepared.run
    write_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(run)))
    write_atomic(output_dir / "ds_config.json", json.dumps(ds_cfg, indent=2))
    log_plan(prepared)
