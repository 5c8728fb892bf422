"""Preflight: everything checkable before a process group exists, gathered in :class:`Prepared`."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from pipefit.config import ConfigError, RunConfig, check_world, validate
from pipefit.config.compose import model_folder
from pipefit.data import tasks as data_tasks
from pipefit.data.batches import BatchLayout, GlobalBatches
from pipefit.model import lora as trainable
from pipefit.model.hf import load_hf_config, load_tokenizer, resolve_tokenizer_path, set_attn_implementation
from pipefit.model.layer_list import check_run, layer_plan, make_skeleton
from pipefit.model.weights import SafetensorsReader
from pipefit.partition import costs, search
from pipefit.partition.boundaries import boundaries_for
from pipefit.run import checkpoint, outputs
from pipefit.run.ds_config import (
    apply_accelerate_settings,
    check_precision,
    load_base_config,
    read_accelerate_env,
)
from pipefit.run.schedule import lr_schedule

log = logging.getLogger("pipefit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_single_process_env() -> None:
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


class Prepared:
    """Everything a run needs that can be worked out (and fail) before a process group exists."""

    def __init__(self, run: RunConfig, world_size: int, base_ds_config: dict[str, Any] | None = None) -> None:
        self.run = run
        self.base_ds_config = base_ds_config  # keys of a user's --deepspeed_config_file pipefit does not derive
        check_precision(run.train.precision)  # e.g. fp16 where the accelerator has none: one line, no ranks yet
        m = run.model
        overrides = dict(m.hf_config)
        self.hf_config = load_hf_config(m.path, overrides)
        set_attn_implementation(self.hf_config, m.attn_implementation)
        self.skeleton = make_skeleton(self.hf_config, seed=run.train.seed)
        self.skeleton.one_document_per_row = run.data.layout == "concat"  # masks skip the packed-document scan
        self.plan = layer_plan(self.skeleton)
        if run.data.layout == "pack" and not self.skeleton.adapter.mask_uses_position_ids:
            raise ConfigError(
                f"data.layout=pack is not accepted for {type(self.hf_config).__name__}: its attention mask ignores "
                "position ids (as in HF), so packed documents would attend to each other; use data.layout=pad"
            )
        check_run(run, self.skeleton)  # the task's own checks: positions, attention, partition
        make_batches = data_tasks.batch_maker(self.hf_config, self.skeleton.task)

        found = trainable.trainable_layers(run, self.skeleton)
        self.trainable_layers = found[0] if found else None  # LoRA / train.freeze: what each layer trains
        # auto layout fields: the layout search's best for this world. It prices with flops only, so
        # every rank computes the same layout from the same inputs and nothing is broadcast.
        run, self.auto_layout = search.resolve_auto(run, world_size, self.hf_config, self.plan, self.trainable_layers)
        self.run = run
        stages = run.pipeline.stages
        planned_dp = world_size // stages if world_size >= stages and world_size % stages == 0 else 1
        self.workload = costs.Workload.from_run(run, planned_dp)
        # profile measures on this machine: done once the ranks exist (rank 0 measures, all receive).
        self.deferred_profile = run.pipeline.partition == "profile"
        method = "flops" if self.deferred_profile else run.pipeline.partition
        self.boundaries = boundaries_for(
            self.skeleton,
            method,
            stages,
            run.pipeline.boundaries,
            workload=self.workload,
            hardware=run.hardware,
            trainable=self.trainable_layers,
        )
        self.dp = check_world(run, world_size)
        if m.path:
            # Opening the index now turns a folder without weights into a clear error before any rank starts.

            SafetensorsReader(m.path)
        self.tokenizer_path = resolve_tokenizer_path(m.path, m.tokenizer)
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        vocab = int(self.hf_config.vocab_size)
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"model.tokenizer={str(self.tokenizer_path)!r} has {len(self.tokenizer)} tokens but the model's "
                f"vocab_size is {vocab}; use a matching tokenizer or a larger vocab_size"
            )

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
        # A file, read-only, another run in it, an export over user data:
        outputs.check_output_dir(run, self.tokenizer_path, self.resume_from)

        check_prepared(self)  # train.freeze / lora: patterns, targets, every stage trainable
        self.layout = BatchLayout(run.train.micro_batch_size, run.train.grad_accum_steps, self.dp)
        self.batches, self.eval_batches = make_batches(run.data, self.tokenizer, self.layout, run.train.seed)
        self.eval_rounds = eval_rounds(run.train.eval_batches, self.eval_batches)
        outputs.clear_previous_run(run)  # train.overwrite_output_dir, once every check has passed

    def checkpoint_record(self) -> checkpoint.RunRecord:
        """What a checkpoint records of this run (the boundaries as they are now: profile sets them late)."""
        return checkpoint.RunRecord(
            self.run, self.boundaries, self.dp, self.layout.global_batch_size, self.hf_config, self.tokenizer
        )


def explicit_keys(overrides: list[str]) -> set[str]:
    """Dotted keys set on the Hydra command line (``a.b=c``, ``+a.b=c``, ``++a.b=c``)."""
    keys = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def prepare(cfg: Any, overrides: list[str] | None = None, env: dict[str, str] | None = None) -> Prepared:
    run = validate(model_folder(cfg, overrides or []))
    settings = read_accelerate_env(env)
    run = apply_accelerate_settings(run, settings, explicit_keys(overrides or []))
    run = validate(run)
    lr_schedule(run.optim, run.train.max_steps)  # a transformers schedule's kwargs: checked before any rank
    world = int((env or os.environ).get("WORLD_SIZE", "1"))
    return Prepared(run, world, load_base_config(settings))


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


def check_prepared(prepared: Prepared) -> None:
    """:func:`check` and :func:`check_resume` for a prepared run, before any process group exists."""
    run = prepared.run
    if not (run.lora.enabled or run.train.freeze or prepared.resume_from is not None):
        return
    trainable.check(run, prepared.skeleton, None if prepared.deferred_profile else prepared.boundaries)
    if prepared.resume_from is not None:
        state = checkpoint.read_state(prepared.resume_from)
        trainable.check_resume(run, state.get("config") or {}, prepared.resume_from, prepared.resume_same_shape)
