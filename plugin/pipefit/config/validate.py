"""Validation of a composed config: the values the schema's types cannot check, one line per error."""

from __future__ import annotations

import string
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipefit.config import hardware
from pipefit.config.schema import (
    AUTO,
    AUTO_FIELDS,
    DATA_LAYOUTS,
    DATA_SOURCES,
    DATA_TEMPLATES,
    METRIC_SCHEDULERS,
    OPTIMIZER_IMPLS,
    PIPE_SCHEDULES,
    PRECISIONS,
    SCHEDULERS,
    ConfigError,
    DataConfig,
    RunConfig,
    TrainConfig,
    scheduler_names,
)


def _choice(field_name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{field_name}={value!r} is not accepted; accepted: {', '.join(accepted)}")


def _positive(field_name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field_name}={value!r} is not accepted; expected a number {bound}")


def _integer_or_auto(field_name: str, value: Any, allow_zero: bool = False) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ConfigError(f"{field_name}={value!r} is not accepted; expected an integer {bound} or auto")
    _positive(field_name, value, allow_zero)


def auto_fields(run: RunConfig) -> list[str]:
    """The layout fields set to ``auto`` (:data:`AUTO_FIELDS` order)."""
    values = (run.pipeline.stages, run.train.micro_batch_size, run.pipeline.activation_checkpoint_interval)
    return [name for name, v in zip(AUTO_FIELDS, values, strict=True) if v == AUTO]


def check_auto(run: RunConfig) -> None:
    """What an ``auto`` layout needs: a global batch, and a split that the search may choose."""
    auto = auto_fields(run)
    if not auto:
        return
    p, named = run.pipeline, ", ".join(f"{name}=auto" for name in auto)
    if run.train.global_batch_size is None:
        raise ConfigError(
            f"{named} needs train.global_batch_size (sequences per optimizer step) to search layouts for; "
            "set e.g. train.global_batch_size=64"
        )
    if p.boundaries is not None:
        raise ConfigError(
            f"pipeline.boundaries={list(p.boundaries)} cannot be combined with {named}: the layout search chooses "
            "the split; accepted: pipeline.boundaries=null, or explicit pipeline.stages and no auto"
        )
    if p.partition != "flops":
        raise ConfigError(
            f"pipeline.partition={p.partition} cannot be combined with {named}: the layout search splits with the "
            "flops cost model; accepted: pipeline.partition=flops"
        )


def validate_data(d: DataConfig) -> None:
    """The ``data.*`` checks of :func:`validate` (``pipefit.data.batches`` runs them too, for direct callers)."""
    _choice("data.source", d.source, DATA_SOURCES)
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} is not accepted; expected a number in [0, 1)")
    if d.eval_split is not None and d.source == "pydoc":
        raise ConfigError(
            "data.eval_split is set but data.source=pydoc has one split; use data.eval_fraction to hold out rows"
        )
    if d.seq_len < 2:
        raise ConfigError(f"data.seq_len={d.seq_len} is not accepted; expected an integer >= 2")
    if d.source in ("text", "json") and not d.data_files:
        raise ConfigError(f"data.data_files is empty for data.source={d.source}; give one or more local files")
    if d.source == "hub" and not d.path:
        raise ConfigError("data.path is empty for data.source=hub; give a datasets name or a local dataset folder")
    _choice("data.layout", d.layout, DATA_LAYOUTS)
    if d.template is not None and d.template not in DATA_TEMPLATES:
        raise ConfigError(
            f"data.template={d.template!r} is not accepted; accepted: null (plain text), chat, instruction"
        )
    if d.template is not None and d.layout == "concat":
        raise ConfigError(
            f"data.layout=concat is not accepted with data.template={d.template}: examples must stay whole to mask "
            "their prompts; accepted: pack, pad"
        )
    if d.template == "instruction":
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(d.instruction_format) if f is not None]
        except ValueError as err:
            raise ConfigError(
                f"data.instruction_format={d.instruction_format!r} is not a format string ({err}); "
                "expected text with {prompt} and {response}"
            ) from None
        if (
            names.count("response") != 1
            or not set(names) <= {"prompt", "response"}
            or "prompt" not in names
            or "prompt" in names[names.index("response") :]
        ):
            raise ConfigError(
                f"data.instruction_format={d.instruction_format!r} is not accepted; expected {{prompt}} (one or more "
                "times) followed by {response} once, and no other {fields}"
            )


def to_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    if isinstance(cfg, RunConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def validate(cfg: DictConfig | RunConfig) -> RunConfig:
    """Check values that the schema's types cannot; return the typed config."""
    run = to_run_config(cfg)
    p, t, o, z, d = run.pipeline, run.train, run.optim, run.zero, run.data
    _integer_or_auto("pipeline.stages", p.stages)
    if z.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage={z.stage} is not accepted; accepted: 0, 1, 2, 3")
    if z.stage > 1:
        # DeepSpeed's PipelineEngine rejects ZeRO-2/3 at any stage count, and pipefit always trains through it.
        raise ConfigError(
            f"zero.stage={z.stage} cannot be combined with pipeline.stages={p.stages}: DeepSpeed pipelines "
            "accept ZeRO stage 0 or 1 only; use zero.stage=1"
        )
    named = ("uniform", "parameters", "flops", "profile", "manual")
    if not (p.partition in named or p.partition.lower().startswith("type:")):
        raise ConfigError(
            f"pipeline.partition={p.partition!r} is not accepted; "
            "accepted: uniform, parameters, flops, profile, type:REGEX, manual"
        )
    run.hardware = hardware.resolve_hardware(
        run.hardware, hardware.detect_device_name() if run.hardware.name == "auto" else None
    )
    for key in (
        "peak_tflops_fp32",
        "peak_tflops_bf16",
        "matmul_efficiency",
        "memory_gib",
        "memory_bandwidth_gbs",
        "link_bandwidth_gbs",
    ):
        _positive(f"hardware.{key}", getattr(run.hardware, key))
    if run.hardware.matmul_efficiency > 1:
        raise ConfigError(
            f"hardware.matmul_efficiency={run.hardware.matmul_efficiency} is not accepted; expected a number in (0, 1]"
        )
    _integer_or_auto("pipeline.activation_checkpoint_interval", p.activation_checkpoint_interval, allow_zero=True)
    check_pipe_schedule(run)
    _positive("train.max_steps", t.max_steps)
    _integer_or_auto("train.micro_batch_size", t.micro_batch_size)
    if t.global_batch_size is not None:
        _positive("train.global_batch_size", t.global_batch_size)
    _positive("train.grad_accum_steps", t.grad_accum_steps)
    _positive("train.log_every", t.log_every)
    _positive("train.dist_timeout_s", t.dist_timeout_s)
    _positive("train.save_every", t.save_every, allow_zero=True)
    _positive("train.keep_last", t.keep_last, allow_zero=True)
    if t.stop_after_steps is not None:
        _positive("train.stop_after_steps", t.stop_after_steps)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.eval_batches", t.eval_batches, allow_zero=True)
    if t.eval_every > 0 and d.eval_split is None and d.eval_fraction == 0:
        raise ConfigError(
            f"train.eval_every={t.eval_every} needs evaluation data; set data.eval_fraction=0.05 (or data.eval_split "
            "to a held-out split of the source), or train.eval_every=0"
        )
    _positive("train.heartbeat_interval_s", t.heartbeat_interval_s)
    _positive("train.heartbeat_timeout_s", t.heartbeat_timeout_s, allow_zero=True)
    if 0 < t.heartbeat_timeout_s < 2 * t.heartbeat_interval_s:
        raise ConfigError(
            f"train.heartbeat_timeout_s={t.heartbeat_timeout_s} is not accepted; expected 0 (off) or at least "
            f"2 x train.heartbeat_interval_s ({2 * t.heartbeat_interval_s})"
        )
    check_trace_steps(t)
    _choice("train.precision", t.precision, PRECISIONS)
    if t.precision == "bf16" and z.stage == 0:
        # DeepSpeed's pipeline engine refuses fp32 gradient accumulation for a bf16 model at ZeRO-0.
        raise ConfigError(
            "train.precision=bf16 is not accepted with zero.stage=0: DeepSpeed would accumulate and reduce "
            "gradients in bf16; accepted: zero.stage=1 (fp32 accumulation), or train.precision=fp32 or fp16 at "
            "ZeRO stage 0"
        )
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    check_scheduler(o.scheduler, dict(o.scheduler_kwargs))
    _choice("optim.impl", o.impl, OPTIMIZER_IMPLS)
    if o.name.lower() != "adamw":
        raise ConfigError(f"optim.name={o.name!r} is not accepted; accepted: adamw")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} is not accepted; expected two numbers in [0, 1)")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} is not accepted; expected a number in [0, 1]")
    if not run.model.path and not run.model.hf_config.get("model_type"):
        raise ConfigError(
            "model.path is not set and model.hf_config has no model_type; give model.path=/local/hf/folder "
            "or a preset with hf_config.model_type (e.g. model=llama_tiny)"
        )
    validate_data(d)
    check_attention(run)
    check_auto(run)
    return run


def check_pipe_schedule(run: RunConfig) -> None:
    """``pipeline.schedule``: a known name, and zb1p only where its split backward is proven."""
    p = run.pipeline
    _choice("pipeline.schedule", p.schedule, PIPE_SCHEDULES)
    if p.schedule != "zb1p":
        return
    if p.stages != AUTO and p.stages < 2:
        raise ConfigError(
            f"pipeline.schedule=zb1p cannot be combined with pipeline.stages={p.stages}: "
            "zero-bubble needs pipeline.stages >= 2; use pipeline.schedule=1f1b"
        )
    if run.train.precision == "fp16":
        # Not yet proven against 1f1b: fp16's dynamic loss scaler and its overflow checks.
        raise ConfigError(
            "pipeline.schedule=zb1p cannot be combined with train.precision=fp16; accepted: fp32, bf16 "
            "(or pipeline.schedule=1f1b)"
        )


def check_trace_steps(t: TrainConfig) -> None:
    """``train.trace_steps``: null, or ``[first, last]`` inside the steps this launch runs."""
    if t.trace_steps is None:
        return
    last = t.max_steps
    if t.stop_after_steps is not None and t.resume is None:
        last = min(last, t.stop_after_steps)  # a fresh launch ends there
    steps = list(t.trace_steps)
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1] <= last:
        end = "train.max_steps" if last == t.max_steps else "train.stop_after_steps"
        raise ConfigError(
            f"train.trace_steps={steps} is not accepted; expected [first, last] with 1 <= first <= last <= "
            f"{end} ({last}), or null (every step)"
        )


def check_scheduler(name: str, kwargs: dict[str, Any]) -> None:
    """``optim.scheduler`` is one of :func:`scheduler_names`; its kwargs are checked where it is built."""
    if name in METRIC_SCHEDULERS:
        raise ConfigError(
            f"optim.scheduler={name} is not accepted: it steps on an evaluation metric, and pipefit steps the "
            f"schedule on optimizer updates; accepted: {', '.join(scheduler_names())}"
        )
    _choice("optim.scheduler", name, scheduler_names())
    if name in SCHEDULERS and kwargs:
        raise ConfigError(
            f"optim.scheduler_kwargs={kwargs} is not accepted with optim.scheduler={name} (set optim.warmup_steps "
            "and optim.min_lr_ratio); accepted: {} here, or a transformers schedule such as cosine_with_min_lr"
        )


def check_attention(run: RunConfig) -> None:
    """One-line errors for flash-attention combinations that fail or silently attend across documents.

    flash-attn kernels take bf16/fp16 only (fp32 fails at the first forward, inside flash-attn). With
    ``data.layout=pack`` HF's flash path keeps the packed documents apart only for a micro-batch of one
    row (it reads their boundaries from the position ids of a single row); with more rows documents
    would attend to each other.
    """
    impl, t = run.model.attn_implementation or "", run.train  # null picks sdpa or eager
    if "flash" not in impl:
        return
    if t.precision == "fp32":
        raise ConfigError(
            f"model.attn_implementation={impl} is not accepted with train.precision=fp32: flash-attn runs in "
            "bf16/fp16 only; use train.precision=bf16 or model.attn_implementation=sdpa"
        )
    if run.data.layout == "pack" and t.micro_batch_size != AUTO and t.micro_batch_size > 1:
        raise ConfigError(
            f"model.attn_implementation={impl} with data.layout=pack needs train.micro_batch_size=1 (got "
            f"{t.micro_batch_size}): HF's flash path separates packed documents in one-row micro-batches only; "
            "use train.micro_batch_size=1 or model.attn_implementation=sdpa"
        )


def check_world(run: RunConfig, world_size: int) -> int:
    """Data-parallel degree for ``world_size`` ranks, or a clear error. Call before init_process_group."""
    stages = run.pipeline.stages
    if world_size < stages:
        raise ConfigError(
            f"pipeline.stages={stages} needs at least {stages} ranks but this launch has {world_size}; "
            f"start {stages} (or a multiple) processes, e.g. "
            f"accelerate launch --use_deepspeed --num_processes {stages} "
            "(on a CPU-only machine plain --num_processes without --use_deepspeed or a launch/ config starts one)"
        )
    if world_size % stages:
        raise ConfigError(
            f"world size {world_size} is not divisible by pipeline.stages={stages}; "
            f"use a multiple of {stages} processes"
        )
    dp = world_size // stages
    t = run.train
    expected = t.micro_batch_size * t.grad_accum_steps * dp
    if t.global_batch_size is not None and t.global_batch_size != expected:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} != train.micro_batch_size ({t.micro_batch_size}) x "
            f"train.grad_accum_steps ({t.grad_accum_steps}) x data-parallel size ({dp}) = {expected}; "
            "make them agree or leave train.global_batch_size unset"
        )
    return dp
