"""The training loop: ``engine.train_batch`` per step, evaluation, checkpoints on schedule."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from pipefit.data.batches import GlobalBatches
from pipefit.model.layers import IGNORE_INDEX
from pipefit.run import checkpoint
from pipefit.run.preflight import Prepared
from pipefit.run.reporting import _Reporter
from pipefit.run.trace import Tracer

log = logging.getLogger("pipefit")


def evaluate(engine: Any, batches: GlobalBatches, rounds: int) -> tuple[float, int]:
    """Token-weighted mean loss over the first ``rounds`` evaluation rounds (every data-parallel rank's
    rows) and the number of target tokens it covers; the same value on every rank. Collective.

    ``engine.eval_batch`` averages the micro-batch losses over micro-batches and data-parallel ranks,
    and each micro-batch's loss is its summed token loss times ``scale``. With
    ``scale = micro-batches x dp / T`` (T: target tokens in every row read) that average is exactly
    ``sum(token losses) / T``, however the targets are spread over rows and ranks.
    """
    dp = batches.layout.dp
    dp_rank = engine.grid.get_data_parallel_rank()
    tokens = 0
    mine = []
    for step in range(rounds):
        for r in range(dp):
            for inputs, (targets, _) in batches.micro_batches(step, r):
                tokens += int((targets != IGNORE_INDEX).sum())
                if r == dp_rank:
                    mine.append((inputs, targets))
    scale = torch.tensor([len(mine) * dp / max(tokens, 1)])
    loss = engine.eval_batch(iter([(x, (y, scale)) for x, y in mine]), num_micro_batches=len(mine))
    engine.module.train()
    return float(loss), tokens


def timed_train_batch(
    engine: Any, synchronize: Callable[[], None] | None = None, clock: Callable[[], float] = time.time
) -> tuple[Any, float]:
    """``engine.train_batch()`` and its seconds, the device's queued work included.

    On a GPU ``train_batch`` returns once its kernels are queued; the loss's ``.cpu()`` waits for them
    on the last stage only. Synchronising first makes ``step_time_s`` (and tokens/s) every stage's real
    step time. ``synchronize`` defaults to the DeepSpeed accelerator's (a no-op on CPU).
    """
    if synchronize is None:
        from deepspeed.accelerator import get_accelerator

        synchronize = get_accelerator().synchronize
    t0 = clock()
    loss = engine.train_batch()
    synchronize()
    return loss, clock() - t0


def train_steps(
    engine: Any, prepared: Prepared, output_dir: Path, rank: int, first: int = 0
) -> tuple[list[float], int]:
    """Steps ``first+1`` to ``train.max_steps`` (at most ``train.stop_after_steps`` of them).

    Evaluates every ``train.eval_every`` steps and after step ``train.max_steps``. Returns the
    losses and the last step run.
    """
    dp_rank = engine.grid.get_data_parallel_rank()
    if engine.is_first_stage() or engine.is_last_stage():
        engine.set_dataiterator(prepared.batches.iterate(dp_rank, start_step=first))
    run = prepared.run
    metrics_path = output_dir / "metrics.jsonl"
    tokens = prepared.batches.tokens_per_step()
    losses: list[float] = []
    start = time.time()
    last = run.train.max_steps
    if run.train.stop_after_steps is not None:
        last = min(last, first + run.train.stop_after_steps)
    every_eval = run.train.eval_every
    reporter = _Reporter(engine, run, output_dir, rank, first)
    tracer = start_trace(engine, run, first)
    step = first
    with ExitStack() as stack:
        stack.callback(reporter.close)
        if reporter.bar is not None:
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())  # log lines print above the bar
        for step in range(first + 1, last + 1):
            tracer.begin_step(step)
            lr = float(engine.get_lr()[0])  # the rate this step's update uses
            loss, dt = timed_train_batch(engine)
            with tracer.span("Logging"):
                value = float(loss.detach().float().cpu())
                losses.append(value)
                stage_times = reporter.stage_times(dt)
            evaluated = None
            if every_eval and (step % every_eval == 0 or step == run.train.max_steps):
                assert prepared.eval_batches is not None  # validate() requires evaluation data
                with tracer.span("Evaluate"):
                    evaluated = evaluate(engine, prepared.eval_batches, prepared.eval_rounds)
            if rank == 0:
                with tracer.span("Logging"):
                    _record_step(
                        engine, run, metrics_path, reporter, stage_times, step, value, lr, dt, tokens, evaluated, start
                    )
            tracer.end_step()
            every = run.train.save_every
            if (every and step % every == 0) or (step == last and (every or last < run.train.max_steps)):
                path = checkpoint.save(engine, prepared.checkpoint_record(), output_dir, step, rank)
                if rank == 0:
                    log.info("saved checkpoint %s", path)
        if run.train.trace:
            reporter.trace(tracer, output_dir, step)
    return losses, step


def start_trace(engine: Any, run: Any, first: int) -> Tracer:
    """``train.trace``: a tracer over ``train.trace_steps`` on this engine, its clock aligned to rank 0's.
    Collective when tracing; otherwise a tracer that records nothing."""
    import torch.distributed as dist

    t = run.train
    if not t.trace:
        return Tracer(first=1, last=0)
    lo, hi = (t.trace_steps[0], t.trace_steps[1]) if t.trace_steps else (first + 1, None)
    tracer = Tracer(first=lo, last=hi)
    tracer.align(dist.all_gather_object, dist.barrier, dist.get_world_size())
    engine.trace(tracer)
    return tracer


def _record_step(
    engine: Any,
    run: Any,
    metrics_path: Path,
    reporter: _Reporter,
    stage_times: dict[int, float],
    step: int,
    value: float,
    lr: float,
    dt: float,
    tokens: int,
    evaluated: tuple[float, int] | None,
    start: float,
) -> None:
    """Rank 0: the step's ``metrics.jsonl`` line, log line and reporter update."""
    norm = engine.get_global_grad_norm()
    record: dict[str, Any] = {
        "step": step,
        "loss": value,
        "lr": lr,
        "grad_norm": None if norm is None else float(norm),
        "tokens_per_s": tokens / dt if dt > 0 else None,
        "step_time_s": dt,
    }
    if evaluated is not None:
        eval_loss, eval_tokens = evaluated
        ppl = math.exp(eval_loss) if eval_loss < 700 else math.inf
        record.update({"eval_loss": eval_loss, "eval_ppl": ppl, "eval_tokens": eval_tokens})
    record.update({"wall_time_s": time.time() - start, "time": time.time()})
    with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if step % run.train.log_every == 0 or step == run.train.max_steps:
        log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, run.train.max_steps, value, lr, tokens / dt)
    if evaluated is not None:
        log.info("step %d eval loss %.4f ppl %.3f (%d tokens)", step, eval_loss, ppl, eval_tokens)
    reporter.step(record, stage_times)
