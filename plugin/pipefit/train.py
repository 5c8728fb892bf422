"""The training run: validate, build this rank's stage, train with ``engine.train_batch``, export.

Everything that can be wrong with the inputs is checked before a process group exists. Every
rank writes into one ``output_dir``; rank 0 writes ``config.yaml``, ``ds_config.json``,
``metrics.jsonl`` (one JSON line per optimizer step, appended; ``eval_loss``, ``eval_ppl`` and
``eval_tokens`` on evaluated steps), ``train.log`` and, with ``train.tensorboard``, ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from pipefit import build as build_mod
from pipefit import outputs
from pipefit.config import ConfigError, RunConfig, check_world, validate
from pipefit.data import BatchLayout, GlobalBatches, build_batches
from pipefit.ds_config import (
    apply_accelerate_settings,
    build_ds_config,
    check_precision,
    load_base_config,
    read_accelerate_env,
)
from pipefit.schedule import scheduler_factory
from pipefit.stages import IGNORE_INDEX

log = logging.getLogger("pipefit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_single_process_env() -> None:
    """Let ``python recipes/finetune.py`` (no launcher) run as a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
            }
        )


CHATTER = "pipefit.library"  # what libraries print or warn: train.log only, at debug level


class _ToLogFile(logging.Filter):
    """``train.log``: pipefit's records at any level, library chatter, and other libraries' warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("pipefit") or record.levelno >= logging.WARNING


class _ToConsole(logging.Filter):
    """The console: pipefit's own lines only (the plan, steps, the result, its warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "pipefit" or (record.name.startswith("pipefit.") and record.name != CHATTER)


class _Demote(logging.Filter):
    """On a library logger with a console handler of its own (DeepSpeed's ``Setting accelerator to
    CPU``, Python warnings such as DeepSpeed's ``all_gather_into_tensor`` FutureWarning): hand the
    record to pipefit's handlers as debug chatter instead, so it reaches ``train.log`` only."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[{record.name}] {record.getMessage()}"
        record.args = None
        record.levelno, record.levelname, record.name = logging.DEBUG, "DEBUG", CHATTER
        logging.getLogger(CHATTER).handle(record)
        return False


_DEMOTE = _Demote()
_FORMAT = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")


class _ChatterWriter:
    """A ``sys.stdout`` stand-in: libraries' ``print`` lines (DeepSpeed's ``SEED_LAYERS=``, ``Using
    topology``, BF16_Optimizer memory printouts, op builds) become debug records in ``train.log``."""

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                logging.getLogger(CHATTER).debug("%s", line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def quiet_console(rank: int) -> None:
    """Before anything else runs on a rank: rank 0's console shows pipefit's lines only; everything
    else is kept (in memory until ``output_dir`` exists, then in ``train.log``) or, on other ranks,
    dropped (rank 0 holds the same). Idempotent.

    torch's "c10d::broadcast_: an autograd kernel was not registered ... silently incorrect
    behavior" warning, one of those kept out of the console, is harmless here: it comes from
    DeepSpeed's ``PipelineModule._synchronize_tied_weights``, which broadcasts a tied embedding's
    parameter in place when the module is built (and when a checkpoint is loaded), before any
    forward pass uses it. torch records that in-place op with a node that warns in the first
    backward and passes the gradient through unchanged, which is the right gradient for a value
    overwritten before use; the tied GPT-2 pipeline-vs-one-process parity test checks the result.
    """
    import logging.handlers

    root = logging.getLogger()
    if any(getattr(h, "_pipefit", False) for h in root.handlers):
        return
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    logging.getLogger("pipefit").setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for name in ("DeepSpeed", "py.warnings"):
        logging.getLogger(name).addFilter(_DEMOTE)
    with contextlib.suppress(ImportError):
        from datasets.utils import logging as datasets_logging

        datasets_logging.disable_progress_bar()  # both ranks' "Map:" bars
        datasets_logging.get_logger().propagate = True
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.INFO)
        console.addFilter(_ToConsole())
        console.setFormatter(_FORMAT)
        buffer = logging.handlers.MemoryHandler(100_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
        buffer.addFilter(_ToLogFile())
        handlers: list[logging.Handler] = [console, buffer]
    else:
        handlers = [logging.NullHandler()]
    for h in handlers:
        h._pipefit = True  # type: ignore[attr-defined]
        root.addHandler(h)


def setup_logging(output_dir: Path, rank: int) -> None:
    """Rank 0 adds ``output_dir/train.log`` (what the console shows, plus library chatter and
    tracebacks at debug level), starting with what was kept before the folder existed."""
    import logging.handlers

    quiet_console(rank)
    if rank != 0:
        return
    root = logging.getLogger()
    output_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(output_dir / "train.log")
    file_handler.setLevel(logging.DEBUG)
    file_handler.addFilter(_ToLogFile())
    file_handler.setFormatter(_FORMAT)
    file_handler._pipefit = True  # type: ignore[attr-defined]
    for h in list(root.handlers):
        if isinstance(h, logging.handlers.MemoryHandler) and getattr(h, "_pipefit", False):
            h.setTarget(file_handler)
            h.flush()
            root.removeHandler(h)
        elif isinstance(h, logging.FileHandler) and getattr(h, "_pipefit", False):
            root.removeHandler(h)
            h.close()
    root.addHandler(file_handler)


def weight_decay_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases or norm weights (1-D tensors). Shared with the reference."""
    decay = [p for _, p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in params if p.requires_grad and p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Prepared:
    """Everything a run needs that can be worked out (and fail) before a process group exists."""

    def __init__(self, run: RunConfig, world_size: int, base_ds_config: dict[str, Any] | None = None) -> None:
        self.run = run
        self.base_ds_config = base_ds_config  # keys of a user's --deepspeed_config_file pipefit does not derive
        check_precision(run.train.precision)  # e.g. fp16 where the accelerator has none: one line, no ranks yet
        m = run.model
        overrides = dict(m.hf_config)
        self.hf_config = build_mod.load_hf_config(m.path, overrides)
        self.hf_config._attn_implementation = m.attn_implementation
        self.skeleton = build_mod.make_skeleton(self.hf_config, seed=run.train.seed)
        self.skeleton.one_document_per_row = run.data.layout == "concat"  # masks skip the packed-document scan
        self.plan = build_mod.layer_plan(self.skeleton)
        if run.data.layout == "pack" and not self.skeleton.adapter.mask_uses_position_ids:
            raise ConfigError(
                f"data.layout=pack is not accepted for {type(self.hf_config).__name__}: its attention mask ignores "
                "position ids (as in HF), so packed documents would attend to each other; use data.layout=pad"
            )
        check_positions(run, self.skeleton)
        make_batches = build_batches
        if self.skeleton.adapter.kind == "encoder":  # encoder tasks (BERT): checks, masked-LM/labelled batches
            from pipefit import encoder

            encoder.check_run(run, self.skeleton)
            make_batches = encoder.make_batches_factory(self.hf_config)
        from pipefit import costs

        stages = run.pipeline.stages
        planned_dp = world_size // stages if world_size >= stages and world_size % stages == 0 else 1
        self.workload = costs.Workload.from_run(run, planned_dp)
        # profile measures on this machine: done once the ranks exist (rank 0 measures, all receive).
        self.deferred_profile = run.pipeline.partition == "profile"
        method = "flops" if self.deferred_profile else run.pipeline.partition
        self.boundaries = build_mod.boundaries_for(
            self.skeleton, method, stages, run.pipeline.boundaries, workload=self.workload, hardware=run.hardware
        )
        self.dp = check_world(run, world_size)
        if m.path:
            # Opening the index now turns a folder without weights into a clear error before any rank starts.
            from pipefit.weights import SafetensorsReader

            SafetensorsReader(m.path)
        self.tokenizer_path = build_mod.resolve_tokenizer_path(m.path, m.tokenizer)
        self.tokenizer = build_mod.load_tokenizer(self.tokenizer_path)
        vocab = int(self.hf_config.vocab_size)
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"model.tokenizer={str(self.tokenizer_path)!r} has {len(self.tokenizer)} tokens but the model's "
                f"vocab_size is {vocab}; use a matching tokenizer or a larger vocab_size"
            )
        from pipefit import checkpoint

        self.resume_from = checkpoint.find_checkpoint(run.train.resume, run.output_dir)
        self.resume_same_shape = False
        self.world_size = world_size
        if self.resume_from is not None:
            state = checkpoint.read_state(self.resume_from)
            checkpoint.check_compatible(state, self.resume_from, self.hf_config)
            self.resume_same_shape = checkpoint.same_shape(state, self.boundaries, run.pipeline.stages, self.dp)
            checkpoint.check_files(
                self.resume_from,
                len(self.plan),
                self.skeleton.adapter.tied(self.hf_config),
                run.pipeline.stages,
                world_size,
                self.resume_same_shape,
            )
        outputs.check_output_dir(self)  # a file, read-only, another run in it, an export over user data
        from pipefit import trainable

        trainable.check_prepared(self)  # train.freeze / lora: patterns, targets, every stage trainable
        self.layout = BatchLayout(run.train.micro_batch_size, run.train.grad_accum_steps, self.dp)
        self.batches, self.eval_batches = make_batches(run.data, self.tokenizer, self.layout, run.train.seed)
        self.eval_rounds = eval_rounds(run.train.eval_batches, self.eval_batches)
        outputs.clear_previous_run(self)  # train.overwrite_output_dir, once every check has passed


def check_positions(run: RunConfig, skeleton: Any) -> None:
    """``data.seq_len`` against the positions the model has: rows longer than a learned position table
    would index past it in the first step (an error here); rotary positions extrapolate (a warning).
    Encoders check their own table (:func:`pipefit.encoder.check_run`)."""
    limit = getattr(skeleton.config, "max_position_embeddings", None)
    seq_len = run.data.seq_len
    if skeleton.adapter.kind == "encoder" or not isinstance(limit, int) or seq_len <= limit:
        return
    if skeleton.adapter.position_embed:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds the model's {limit} learned positions (max_position_embeddings of "
            f"{type(skeleton.config).__name__}); accepted: data.seq_len <= {limit}"
        )
    log.warning(
        "data.seq_len=%d exceeds the model's max_position_embeddings=%d: its positions will extrapolate beyond "
        "the length it was trained for",
        seq_len,
        limit,
    )


def explicit_keys(overrides: list[str]) -> set[str]:
    """Dotted keys set on the Hydra command line (``a.b=c``, ``+a.b=c``, ``++a.b=c``)."""
    keys = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def prepare(cfg: Any, overrides: list[str] | None = None, env: dict[str, str] | None = None) -> Prepared:
    run = validate(cfg)
    settings = read_accelerate_env(env)
    run = apply_accelerate_settings(run, settings, explicit_keys(overrides or []))
    run = validate(run)
    world = int((env or os.environ).get("WORLD_SIZE", "1"))
    return Prepared(run, world, load_base_config(settings))


def export_pipeline(
    engine: Any,
    prepared: Prepared,
    out_dir: Path,
    tag: str,
    frozen_fp32: dict[int, torch.Tensor] | None = None,
    frozen_from_folder: FrozenFromFolder | None = None,
) -> None:
    """Every stage writes its own shard (dp rank 0 only); rank 0 adds index, config, tokenizer; atomic.

    Written are the trained weights in the model config's dtype (:func:`export_dtype`); under
    bf16/fp16 those are the optimizer's fp32 master weights and, for frozen parameters (which have
    no master), their fp32 values as loaded (``frozen_fp32``, by ``id(param)``, or read again from
    the model folder by ``frozen_from_folder``; a frozen parameter in neither is exact in its
    training copy), cast once, never the rounded training copies.
    LoRA adapters are merged in fp32 too. Masters are fetched one layer at a time and each tensor
    goes to the host already in the export dtype, so a rank holds one layer's masters and its shard.
    """
    import torch.distributed as dist

    from pipefit.weights import finalize_export, hf_state_dict, staging_dir, write_shard

    module = engine.module
    stage = engine.stage_id
    num_stages = engine.num_stages
    rank = dist.get_rank()
    staging = staging_dir(out_dir, tag)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dtype = export_dtype(prepared.hf_config)
    names: list[str] = []
    filename = f"model-{stage + 1:05d}-of-{num_stages:05d}.safetensors"
    writer = engine.grid.get_data_parallel_rank() == 0
    tensors: dict[str, torch.Tensor] = {}
    tied_ids = {id(m) for m in module.tied_modules.values()}
    for layer in build_mod.stage_layers(module):
        if id(layer) in tied_ids and stage != 0:
            continue  # the tied embedding is saved once, by the stage that owns the embedding
        masters = master_weights(engine, layer.parameters())  # every dp rank of the stage takes part
        if not writer:
            continue
        again = frozen_from_folder.values(layer.parameters()) if frozen_from_folder is not None else {}
        with fp32_parameters(layer, {**(frozen_fp32 or {}), **again, **masters}):
            tensors.update(
                {
                    k: v.to(device="cpu", dtype=dtype) if v.is_floating_point() else v.to("cpu")
                    for k, v in hf_state_dict(layer).items()
                }
            )
        del masters, again
    if writer:
        write_shard(tensors, staging, filename)
        names = sorted(tensors)
    del tensors
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (filename, names))
    if rank == 0:
        shards: dict[str, list[str]] = {}
        for fname, ns in gathered:
            if ns:
                shards[fname] = ns
        finalize_export(staging, out_dir, shards, prepared.hf_config, prepared.tokenizer)
    dist.barrier()


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
    interrupts = _InterruptFlag()
    try:
        with contextlib.redirect_stdout(_ChatterWriter()), interrupts:  # type: ignore[type-var]
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=run.train.dist_timeout_s))
            if run.train.heartbeat_timeout_s > 0 and world > 1:
                from pipefit.watchdog import PeerWatchdog

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
        code = _end_rank(exc, interrupts.seen, watchdog, run, rank, describe(rank))
        raise SystemExit(code) from None
    finally:
        if watchdog is not None:
            watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


class _InterruptFlag:
    """Within the block, SIGINT (Ctrl-C, which reaches every rank) is remembered before it raises
    ``KeyboardInterrupt``: a rank whose collective then fails because a peer stopped first knows
    it was interrupted, not broken."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self) -> _InterruptFlag:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective or point-to-point failure, the way a lost peer first shows."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError | ConnectionError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")
    )


def _say(line: str) -> None:
    """One line on the console (stderr, which the launcher passes through) and in ``train.log``."""
    print(line, file=sys.stderr, flush=True)
    log.debug("%s", line)


def _end_rank(exc: BaseException, interrupted: bool, watchdog: Any, run: RunConfig, rank: int, me: str) -> int:
    """How a rank ends after ``exc`` (its exit status), saying at most one line.

    Ctrl-C: rank 0 says where the run stopped (130). A peer that reported its own failure: this
    rank's error is only the echo of it; end quietly (1). A communication error with no failed
    peer: a peer may be gone; the watchdog names it within its timeout (3). Anything else is this
    rank's own error: one line naming the rank, at once (1). The traceback goes to ``train.log``.
    """
    import traceback

    detail = "".join(traceback.format_exception(exc))
    if interrupted or isinstance(exc, KeyboardInterrupt):
        if rank == 0:
            _say(f"pipefit: {interrupted_line(run)}")
        log.debug("rank %d interrupted in:\n%s", rank, detail)
        return 130
    if watchdog is not None:
        if watchdog.failed_peer() is None and _is_communication_error(exc):
            deadline = time.monotonic() + run.train.heartbeat_timeout_s * 1.5
            while time.monotonic() < deadline and watchdog.verdict is None and watchdog.failed_peer() is None:
                time.sleep(min(0.1, run.train.heartbeat_interval_s))
            if watchdog.verdict is not None:
                return 3
        if watchdog.failed_peer() is not None:
            log.debug("%s stopped after rank %d failed:\n%s", me, watchdog.failed_peer(), detail)
            return 1
        watchdog.mark_failed()
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _say(f"pipefit: error: {me}: {type(exc).__name__}: {message} (traceback in {run.output_dir}/train.log)")
    _append_traceback(Path(run.output_dir), me, detail)
    return 1


def _append_traceback(output_dir: Path, me: str, detail: str) -> None:
    """The failing rank's traceback in ``train.log`` (rank 0 through its log; others append)."""
    if logging.getLogger().handlers and any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
        log.debug("%s failed:\n%s", me, detail)
        return
    with contextlib.suppress(OSError):
        if output_dir.is_dir():
            with (output_dir / "train.log").open("a") as f:
                f.write(f"[{me}] failed:\n{detail}")


def interrupted_line(run: RunConfig) -> str:
    """``interrupted at step N; newest complete checkpoint: ...`` from what rank 0 has written."""
    from pipefit import checkpoint

    output_dir = Path(run.output_dir)
    step = 0
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
        step = int(json.loads(lines[-1])["step"])
    newest = None
    with contextlib.suppress(ValueError, OSError):
        newest = checkpoint.find_checkpoint("auto", output_dir)
    if newest is None:
        saving = f"train.save_every={run.train.save_every}"
        return f"interrupted at step {step}; no complete checkpoint to resume from ({saving})"
    return f"interrupted at step {step}; newest complete checkpoint: {newest}; resume with train.resume=auto"


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


def _train_on_rank(
    prepared: Prepared, rank: int, output_dir: Path, accel: Any, device_kind: str, topo: Any
) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist

    run = prepared.run
    if device_kind != "cpu":
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = accel.current_device_name() if device_kind != "cpu" else "cpu"
    if prepared.deferred_profile:
        _profile_partition(prepared, rank, device)
    torch.manual_seed(run.train.seed)
    module = build_mod.build_pipeline_module(
        prepared.skeleton, prepared.boundaries, topo, device, run.pipeline.activation_checkpoint_interval
    )
    stage_id = topo.get_coord(rank).pipe
    local = (module._local_start, module._local_stop)
    wanted = (prepared.boundaries[stage_id], prepared.boundaries[stage_id + 1])
    if local != wanted:  # guards the private DeepSpeed hook in build.build_pipeline_module
        raise RuntimeError(f"stage {stage_id} holds layers {local}, expected {wanted}; DeepSpeed version unsupported")
    if run.model.path:
        build_mod.load_weights(module, prepared.skeleton, run.model.path)
    from pipefit import trainable

    trainable.apply(module, prepared)  # train.freeze / lora, before the optimizer sees the parameters
    ds_cfg = build_ds_config(run, prepared.dp, device_kind, prepared.base_ds_config)
    if rank == 0:
        from omegaconf import OmegaConf

        write_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(run)))
        write_atomic(output_dir / "ds_config.json", json.dumps(ds_cfg, indent=2))
        _log_plan(prepared)
    writer = topo.get_coord(rank).data == 0  # the data-parallel rank that exports this stage
    from_folder = None
    if run.train.precision != "fp32" and writer and run.model.path:
        from_folder = FrozenFromFolder(module, prepared.skeleton, run.model.path)
    loaded = rounded_by_cast(module, run.train.precision, writer, from_folder)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        config=ds_cfg,
        model_parameters=weight_decay_groups(list(module.named_parameters()), run.optim.weight_decay),
        lr_scheduler=scheduler_factory(run.optim, run.train.max_steps),
    )
    restore_fp32_masters(engine, loaded)
    # Frozen parameters have no fp32 master: keep their loaded values for an exact export.
    frozen_fp32 = {id(p): loaded[n] for n, p in engine.module.named_parameters() if n in loaded and not p.requires_grad}
    del loaded
    if run.zero.stage == 0 and run.optim.grad_clip > 0:
        install_global_norm_clipping(engine)
    if run.zero.stage == 1:
        install_single_collective_grad_norm(engine)
    from pipefit import checkpoint

    engine.checkpoint_engine = checkpoint.SafeTorchCheckpointEngine()
    start = 0
    if prepared.resume_from is not None:
        if prepared.resume_same_shape:
            start = checkpoint.load(engine, prepared.resume_from, rank)
            kept = "weights, optimizer state, schedule, RNG, data position"
        else:
            start = checkpoint.load_reshaped(engine, prepared.resume_from)
            kept = "weights, schedule, data position (new pipeline shape: optimizer moments restart from zero)"
        if rank == 0:
            log.info("resumed from %s at step %d; kept %s", prepared.resume_from, start, kept)
    dp_rank = engine.grid.get_data_parallel_rank()
    if engine.is_first_stage() or engine.is_last_stage():
        engine.set_dataiterator(prepared.batches.iterate(dp_rank, start_step=start))
    losses, last = _loop(engine, prepared, output_dir, rank, start)
    _write_partition(engine, prepared, output_dir, rank, stage_id)
    if last < run.train.max_steps:
        if rank == 0:
            log.info("stopping after step %d (train.stop_after_steps); resume with train.resume=auto", last)
        return {"losses": losses, "boundaries": prepared.boundaries, "stage": engine.stage_id, "last_step": last}
    if run.train.export:
        export_dir = output_dir / "hf_model"
        export_pipeline(engine, prepared, export_dir, f"step{run.train.max_steps}", frozen_fp32, from_folder)
        trainable.export_adapter(engine, prepared, output_dir / trainable.ADAPTER_DIR)  # lora: peft folder
        save_probe_logits(engine, prepared, export_dir)
        if rank == 0:
            log.info("exported Hugging Face model to %s", export_dir)
    dist.barrier()
    return {"losses": losses, "boundaries": prepared.boundaries, "stage": engine.stage_id}


def _profile_partition(prepared: Prepared, rank: int, device: str) -> None:
    """``pipeline.partition=profile``: rank 0 times each distinct layer here, every rank gets the
    same figures (so the same boundaries); results are cached per (config, shape, dtype, device)."""
    import torch.distributed as dist

    from pipefit import checkpoint, costs

    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    run = prepared.run
    hw = costs.Hardware.from_config(run.hardware)
    layer_costs = costs.price_layers(
        prepared.skeleton, "profile", prepared.workload, hw, device, measure=rank == 0, broadcast=broadcast
    )
    prepared.boundaries = build_mod.boundaries_for(
        prepared.skeleton, "profile", run.pipeline.stages, None, layer_costs=layer_costs
    )
    if prepared.resume_from is not None:
        state = checkpoint.read_state(prepared.resume_from)
        prepared.resume_same_shape = checkpoint.same_shape(state, prepared.boundaries, run.pipeline.stages, prepared.dp)


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


class FrozenFromFolder:
    """Frozen fp32 values the model folder holds exactly, read again at export instead of kept.

    A frozen parameter has no fp32 master; under bf16/fp16 its exact value serves only the export.
    Where the folder holds that very value (compared when found), the export reads it back one
    layer at a time, rather than the host keeping a copy of the frozen base for the whole run.
    """

    def __init__(self, module: torch.nn.Module, skeleton: Any, folder: str) -> None:
        import re

        from pipefit.weights import SafetensorsReader

        self.reader = SafetensorsReader(folder)
        aliases = {**dict(skeleton.adapter.checkpoint_aliases), **build_mod.tied_aliases(skeleton)}
        self.candidates: dict[int, str] = {}  # id(param) -> the folder's tensor name, as load_layer resolves it
        for layer in build_mod.stage_layers(module):
            for local, prefix in layer.hf_prefixes.items():
                for key, param in getattr(layer, local).named_parameters():
                    plain = re.sub(r"(^|[.])base_layer[.]", r"\1", key)  # LoRA wraps the base weight
                    hf = f"{prefix}.{plain}"
                    if hf not in self.reader.weight_map:
                        hf = aliases.get(hf, hf)
                    if hf in self.reader.weight_map:
                        self.candidates[id(param)] = hf
        self.names: dict[int, str] = {}  # the frozen parameters read again at export

    def holds(self, param: torch.nn.Parameter) -> bool:
        """Whether the folder holds ``param``'s present value exactly (then it is read again at export)."""
        name = self.candidates.get(id(param))
        if name is None:
            return False
        stored = self.reader.read([name])[name]
        if stored.shape != param.shape or not torch.equal(stored.to(param.device, torch.float32), param.data):
            return False
        self.names[id(param)] = name
        return True

    def values(self, params: Iterable[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
        """The fp32 values of those of ``params`` read again, by ``id(param)``."""
        wanted = {id(p): self.names[id(p)] for p in params if id(p) in self.names}
        read = self.reader.read(set(wanted.values())) if wanted else {}
        return {i: read[n].to(torch.float32) for i, n in wanted.items()}


def rounded_by_cast(
    module: torch.nn.Module, precision: str, writer: bool, folder: FrozenFromFolder | None = None
) -> dict[str, torch.Tensor]:
    """Host copies of the fp32 values that casting to ``precision`` would round, by parameter name.

    bf16/fp16: DeepSpeed casts the parameters, then makes its fp32 master weights from the cast
    copies; :func:`restore_fp32_masters` makes these values the masters instead. Only what is
    needed is kept: a value the cast leaves exact (every weight of a bf16 checkpoint under bf16)
    needs no copy, and a frozen parameter (no master; the copy only serves the export) is kept on
    the data-parallel rank that exports (``writer``) only, and not at all where ``folder`` holds
    it exactly (the export reads it again). Empty under fp32.
    """
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is None:
        return {}
    kept = {}
    for name, param in module.named_parameters():
        if not (param.requires_grad or writer) or param.dtype != torch.float32:
            continue
        # In slices, so the check's temporaries stay small next to a large embedding.
        flat = param.data.reshape(-1)
        if any(not torch.equal(part.to(half).float(), part) for part in flat.split(1 << 20)):
            if not param.requires_grad and folder is not None and folder.holds(param):
                continue
            kept[name] = param.data.to("cpu")
    return kept


def restore_fp32_masters(engine: Any, loaded: dict[str, torch.Tensor]) -> None:
    """Make ``loaded`` (fp32 values by parameter name) the optimizer's fp32 master weights.

    Under bf16/fp16 DeepSpeed would start its masters from the rounded copies; this keeps a loaded
    (or freshly initialised) fp32 model exact. Each rank writes only its own shard: no collective.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in engine.module.named_parameters():
        value = loaded.get(name)
        if value is not None and value.dtype == torch.float32 and param.requires_grad:
            safe_set_full_fp32_param(param, value.to(param.device))


@contextlib.contextmanager
def fp32_parameters(layer: torch.nn.Module, values: dict[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, each parameter of ``layer`` found in ``values`` (by ``id``) holds that fp32 value."""
    swapped = []
    for param in layer.parameters():
        value = values.get(id(param))
        if value is not None:
            swapped.append((param, param.data))
            param.data = value.to(param.device)
    try:
        yield
    finally:
        for param, data in swapped:
            param.data = data


def master_weights(engine: Any, params: Iterable[torch.nn.Parameter] | None = None) -> dict[int, torch.Tensor]:
    """The fp32 master copy of each of ``params`` (default: the whole stage) under bf16/fp16, keyed by
    ``id(param)``, where the masters live (no host copy).

    Collective over each stage's data-parallel group (ZeRO shards the masters): every rank of the
    stage calls it with the same parameters, in the same order; only data-parallel rank 0 (the one
    that writes exports) keeps the result, the others get ``{}``. Empty under fp32, where the
    module's parameters are the masters. Callers ask one layer at a time, so at most one layer's
    masters are held.
    """
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    keep = engine.grid.get_data_parallel_rank() == 0
    out = {}
    for param in engine.module.parameters() if params is None else params:
        full = safe_get_full_fp32_param(param)
        if full is not None and keep:
            out[id(param)] = full.detach()
    return out


def export_dtype(hf_config: Any) -> torch.dtype:
    """The dtype the export writes: the model config's ``dtype`` (fp32 when it names none)."""
    dtype = getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def eval_rounds(requested: int, batches: GlobalBatches | None) -> int:
    """Rounds (``micro_batch_size x dp`` held-out rows each) one evaluation reads; ``train.eval_batches=0``: all."""
    if batches is None:
        return 0
    available = batches.steps_per_epoch
    if requested > available:
        raise ConfigError(
            f"train.eval_batches={requested} is more than the evaluation data holds: {available} rounds of "
            f"{batches.layout.global_batch_size} rows; accepted: 0 (all) to {available}"
        )
    return requested or available


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


def save_probe_logits(engine: Any, prepared: Prepared, export_dir: Path) -> None:
    """Run one micro-batch through the trained pipeline and keep its logits beside the export.

    ``pipeline_probe.safetensors`` (input_ids, position_ids, logits) lets anyone check that
    ``from_pretrained(export_dir)`` reproduces the pipeline's logits, without pipefit.
    """
    from safetensors.torch import save_file

    probe = prepared.batches.micro_batches(0, 0)[0]
    _, logits = engine.eval_batch(iter([probe]), return_logits=True, num_micro_batches=1)
    engine.module.train()
    if engine.is_last_stage() and engine.grid.get_data_parallel_rank() == 0:
        (ids, pos), _ = probe
        tensors = {"input_ids": ids, "position_ids": pos, "logits": logits.detach().float().cpu().contiguous()}
        tmp = export_dir / ".pipeline_probe.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, export_dir / "pipeline_probe.safetensors")
    import torch.distributed as dist

    dist.barrier()


def _write_partition(engine: Any, prepared: Prepared, output_dir: Path, rank: int, stage_id: int) -> None:
    """Rank 0 writes ``partition.json``: boundaries, and what each rank built and holds.

    Per rank: its stage and data-parallel index, its layer range, its parameter count and the
    bytes of optimizer state it holds after training (ZeRO-1 divides these by the dp degree).
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
        write_atomic(output_dir / "partition.json", json.dumps(record, indent=2))


def _log_plan(prepared: Prepared) -> None:
    b = prepared.boundaries
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
        self.bar: Any = None
        self.writer: Any = None
        if rank != 0:
            return
        if t.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=t.max_steps, initial=first, unit="step", dynamic_ncols=True, file=sys.stderr)
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # After a resume, TensorBoard drops what an earlier launch logged beyond the resumed step.
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=first + 1 if first else None)

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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


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


def _loop(engine: Any, prepared: Prepared, output_dir: Path, rank: int, first: int = 0) -> tuple[list[float], int]:
    """Steps ``first+1`` to ``train.max_steps`` (at most ``train.stop_after_steps`` of them).

    Evaluates every ``train.eval_every`` steps and after step ``train.max_steps``. Returns the
    losses and the last step run.
    """
    from contextlib import ExitStack

    from pipefit import checkpoint

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
    step = first
    with ExitStack() as stack:
        stack.callback(reporter.close)
        if reporter.bar is not None:
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())  # log lines print above the bar
        for step in range(first + 1, last + 1):
            lr = float(engine.get_lr()[0])  # the rate this step's update uses
            loss, dt = timed_train_batch(engine)
            value = float(loss.detach().float().cpu())
            losses.append(value)
            stage_times = reporter.stage_times(dt)
            evaluated = None
            if every_eval and (step % every_eval == 0 or step == run.train.max_steps):
                assert prepared.eval_batches is not None  # validate() requires evaluation data
                evaluated = evaluate(engine, prepared.eval_batches, prepared.eval_rounds)
            if rank == 0:
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
                    log.info(
                        "step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, run.train.max_steps, value, lr, tokens / dt
                    )
                if evaluated is not None:
                    log.info("step %d eval loss %.4f ppl %.3f (%d tokens)", step, eval_loss, ppl, eval_tokens)
                reporter.step(record, stage_times)
            every = run.train.save_every
            if (every and step % every == 0) or (step == last and (every or last < run.train.max_steps)):
                path = checkpoint.save(engine, prepared, output_dir, step, rank)
                if rank == 0:
                    log.info("saved checkpoint %s", path)
    return losses, step


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story (printed as one line). pipefit's own input errors
    (ConfigError, PartitionError, UnknownFamilyError, CheckpointError, CheckpointStateError) are
    all ValueErrors."""
    return (ValueError, FileNotFoundError)


def _user_error_exit(message: str) -> None:
    """Rank 0 prints ``pipefit: error: message``; every rank exits 2. The other ranks, which find the
    same error, let rank 0 say it once before the launcher, seeing the first exit, stops the rest."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pipefit: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    raise SystemExit(2)


def composition_error_line(exc: BaseException) -> str:
    """Hydra's multi-line composition error (a typo'd key, an unknown preset, a value of the wrong
    type) as one line: what failed, why, and what is accepted."""
    lines = [x.strip().rstrip(".") for x in str(exc).splitlines() if x.strip()]
    options = getattr(exc, "options", None)
    if options:
        return f"{lines[0]}; accepted: {', '.join(options)}"
    cause = str(exc.__cause__ or "").strip().splitlines()
    line = lines[0] + (f": {cause[0]}" if cause else "")
    for extra in lines[1:]:
        line += f"; {extra[0].lower()}{extra[1:]}"
    return line


def check_overrides(argv: list[str], config_dir: str | os.PathLike) -> None:
    """Compose the recipe's config from plain ``key=value`` arguments before Hydra does, so that an
    error in them is one line (exit 2) rather than Hydra's report. Arguments with Hydra flags or
    ``hydra.*`` keys are left to Hydra."""
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra.") for a in argv):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipefit.cli import compose

    try:
        compose(argv, str(config_dir))
    except (HydraException, OmegaConfBaseException) as exc:
        _user_error_exit(composition_error_line(exc))


def main(cfg: Any, overrides: list[str]) -> dict[str, Any]:
    """Recipe entry: prepare (all checks, no process group), then train. Bad input: one line, exit 2.

    Later failures: one line naming the rank (exit 1); a lost peer: one line from the watchdog
    (exit 3); Ctrl-C: one line saying where to resume (exit 130).
    """
    quiet_console(int(os.environ.get("RANK", "0")))
    try:
        _ensure_single_process_env()
        prepared = prepare(cfg, overrides)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("pipefit: interrupted before training started", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except user_error_types() as exc:
        _user_error_exit(str(exc))
    return train(prepared)
