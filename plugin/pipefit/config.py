"""Config schemas (registered in Hydra's ConfigStore) and validation with one-line errors.

``conf/config.yaml`` lists ``pipefit_schema`` first in its defaults, so every YAML file and every
command-line override is type-checked against these dataclasses at compose time (a misspelt key
fails there). :func:`validate` then checks the values that depend on each other, before any
process group exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZER_IMPLS = ("auto", "torch", "fused")
DATA_SOURCES = ("pydoc", "text", "json", "hub")
DATA_LAYOUTS = ("concat", "pack", "pad")
DATA_TEMPLATES = ("chat", "instruction")
# The chat template used when data.template=chat, data.chat_template is null and the tokenizer has none.
# {% generation %} marks the tokens that are trained on (the assistant's replies, each with its EOS).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the field, the value and what is accepted."""


@dataclass
class ModelConfig:
    name: str = "llama_tiny"
    # Local Hugging Face folder (config.json + safetensors); each rank reads only its stage's tensors.
    path: str | None = None
    # Used when path is null: a HF config built from these keys (model_type required), random init.
    # With a path, these keys override config.json values.
    hf_config: dict[str, Any] = field(default_factory=dict)
    # Tokenizer folder; default: model.path if it holds one, else the embedded offline tokenizer.
    tokenizer: str | None = None
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    name: str = "pydoc"
    # pydoc: CPython's bundled reference docs; text/json: local files via datasets; hub: a datasets name
    # (datasets.load_dataset(path, subset)) or a local folder (written by save_to_disk, or of data files)
    source: str = "pydoc"
    path: str | None = None
    subset: str | None = None
    data_files: list[str] = field(default_factory=list)
    text_field: str = "text"
    # Sequence classification (an encoder with architectures [...ForSequenceClassification]): the column
    # holding each example's label, an integer in [0, num_labels) or a key of the model's label2id.
    label_field: str = "label"
    split: str = "train"
    seq_len: int = 128
    append_eos: bool = True
    # Rows of seq_len tokens: concat (documents joined with EOS, cut into equal blocks), pack (whole
    # documents per row, attention kept inside each), pad (one document per row, truncated, right-padded).
    layout: str = "concat"
    # null: plain text (text_field). chat: messages_field, a list of {role, content}, through the chat
    # template. instruction: prompt_field and response_field through instruction_format. Only the
    # assistant's / response tokens are trained on; both need layout pack or pad.
    template: str | None = None
    messages_field: str = "messages"
    # Jinja chat template marking trained text with {% generation %}; null: the tokenizer's own, or
    # DEFAULT_CHAT_TEMPLATE when the tokenizer has none.
    chat_template: str | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    # {prompt} and {response} are the fields' values; everything from {response} on is trained on (+ EOS).
    instruction_format: str = "### Instruction:\n{prompt}\n\n### Response:\n{response}"
    # Held-out evaluation data: a split of the same source (data.eval_split, e.g. validation), or
    # else the last eval_fraction of the training rows (0: no evaluation data).
    eval_split: str | None = None
    eval_fraction: float = 0.0


@dataclass
class PipelineConfig:
    stages: int = 2
    # uniform | parameters | flops | profile | type:REGEX | manual
    partition: str = "parameters"
    boundaries: list[int] | None = None
    activation_checkpoint_interval: int = 0


@dataclass
class ZeroConfig:
    stage: int = 1
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    scheduler: str = "cosine"
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    # auto: torch.optim.AdamW on CPU, DeepSpeed's fused Adam on GPUs
    impl: str = "auto"


@dataclass
class TrainConfig:
    max_steps: int = 40
    micro_batch_size: int = 4
    grad_accum_steps: int = 4
    # Optional: if set, must equal micro_batch_size * grad_accum_steps * data_parallel_size.
    global_batch_size: int | None = None
    seed: int = 1234
    precision: str = "fp32"
    log_every: int = 1
    # Collective timeout of the process group (a blocked send/recv/all-reduce fails after this).
    dist_timeout_s: int = 300
    # Peer heartbeats: a rank silent for heartbeat_timeout_s is declared lost and every other rank
    # exits non-zero (see pipefit.watchdog). 0 disables the watchdog.
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 20.0
    export: bool = True
    # Checkpoints every save_every optimizer steps (0: only when a launch stops early), newest keep_last kept.
    save_every: int = 0
    keep_last: int = 2
    # null: start fresh; auto: newest complete checkpoint in output_dir (fresh if none); or a checkpoint/run path.
    resume: str | None = None
    # An output_dir holding another run is refused; true: that run's files are removed first (see pipefit.outputs).
    overwrite_output_dir: bool = False
    # End this launch after this many steps (e.g. a job time limit); it saves a checkpoint, and
    # train.resume=auto continues exactly where it stopped. null: run to train.max_steps.
    stop_after_steps: int | None = None
    # Validation loss and perplexity on the held-out data (data.eval_split or data.eval_fraction) every
    # eval_every optimizer steps and after the last one (0: off); each evaluation reads eval_batches
    # rounds of micro_batch_size x data-parallel rows (0: every complete round the held-out data has).
    eval_every: int = 0
    eval_batches: int = 0
    # Rank 0's tqdm bar (tokens/s, loss, ETA), shown only when stderr is a terminal; the log lines stay.
    progress_bar: bool = True
    # Rank 0 writes TensorBoard events to output_dir/tensorboard.
    tensorboard: bool = False
    # Regular expressions matched in full against Hugging Face parameter names (model.embed_tokens.weight,
    # model.layers.0.*): those tensors keep their loaded values (see pipefit.trainable).
    freeze: list[str] = field(default_factory=list)


@dataclass
class HardwareConfig:
    """One device per rank, for pricing layers (``flops``) and ``pipefit plan``; see conf/hardware/."""

    name: str = "cpu"
    peak_tflops_fp32: float = 0.1
    peak_tflops_bf16: float = 0.1
    # Fraction of peak that training matmuls reach.
    matmul_efficiency: float = 0.6
    # Per rank: the partitioner's per-stage memory cap.
    memory_gib: float = 8.0
    memory_bandwidth_gbs: float = 10.0
    # Between two pipeline stages (NVLink, PCIe, loopback), GB/s in one direction.
    link_bandwidth_gbs: float = 2.0


HARDWARE_PRESETS_DIR = Path(__file__).resolve().parents[2] / "conf" / "hardware"
# hardware=auto: the preset whose key appears in the CUDA device's name (torch.cuda.get_device_name).
CUDA_PRESETS = {"H200": "h200", "H100": "h100", "A100": "a100"}
_WARNED_DEVICES: set[str] = set()


def detect_device_name() -> str | None:
    """This rank's CUDA device name, or None without CUDA.

    Asks for the device at ``LOCAL_RANK`` (when visible), so that a rank opens no context on another
    rank's device.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(_local_device_index())


def detect_device_memory_gib() -> float | None:
    """This rank's CUDA device memory in GiB, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(_local_device_index()).total_memory / 1024**3


def _local_device_index() -> int:
    import torch

    index = int(os.environ.get("LOCAL_RANK", "0"))
    return index if index < torch.cuda.device_count() else 0


def resolve_hardware(
    hw: HardwareConfig, device_name: str | None, device_memory_gib: Callable[[], float | None] | None = None
) -> HardwareConfig:
    """``hardware=auto``: the preset of the detected CUDA device (by name) or ``cpu`` without one.

    A CUDA device without a preset is priced with the most conservative GPU preset's compute
    (a100) and its own memory (``device_memory_gib``), with a warning naming what to set: a run
    on such a device must not stop over a price. Fields given besides (``hardware=auto
    hardware.memory_gib=40``; any value other than the schema's default) are kept. Another
    ``hardware`` is returned as it is.
    """
    if hw.name != "auto":
        return hw
    memory = None
    if device_name is None:
        preset = "cpu"
    else:
        found = [p for key, p in CUDA_PRESETS.items() if key in device_name.upper()]
        preset = found[0] if found else "a100"
        if not found:
            memory = (device_memory_gib or detect_device_memory_gib)()
            if device_name not in _WARNED_DEVICES:  # validate runs more than once per launch
                _WARNED_DEVICES.add(device_name)
                logging.getLogger("pipefit").warning(
                    "hardware=auto: CUDA device %r has no preset (device names with %s do); priced with a100's "
                    "compute figures and the device's %.1f GiB; set hardware.peak_tflops_bf16, "
                    "hardware.peak_tflops_fp32 and hardware.link_bandwidth_gbs for exact prices",
                    device_name,
                    ", ".join(CUDA_PRESETS),
                    memory or 0.0,
                )
    values = OmegaConf.to_container(OmegaConf.load(HARDWARE_PRESETS_DIR / f"{preset}.yaml"))
    if memory is not None:
        values.update({"name": "cuda", "memory_gib": round(memory, 2)})  # type: ignore[union-attr]
    default = HardwareConfig()
    for f in fields(HardwareConfig):
        given = getattr(hw, f.name)
        if f.name != "name" and given != getattr(default, f.name):
            values[f.name] = given  # type: ignore[index]
    return HardwareConfig(**values)  # type: ignore[arg-type]


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on decoder-block projections; every base weight frozen. See conf/lora/."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Hugging Face module-name suffixes, matched as peft matches them: q_proj, v_proj (Llama family), c_attn (GPT-2).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    output_dir: str = "outputs/run"


def register_configs() -> None:
    ConfigStore.instance().store(name="pipefit_schema", node=RunConfig)


register_configs()


def _choice(field_name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{field_name}={value!r} is not accepted; accepted: {', '.join(accepted)}")


def _positive(field_name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field_name}={value!r} is not accepted; expected a number {bound}")


def validate_data(d: DataConfig) -> None:
    """The ``data.*`` checks of :func:`validate` (``pipefit.data`` runs them too, for direct callers)."""
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
        import string

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
    _positive("pipeline.stages", p.stages)
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
    run.hardware = resolve_hardware(run.hardware, detect_device_name() if run.hardware.name == "auto" else None)
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
    _positive("pipeline.activation_checkpoint_interval", p.activation_checkpoint_interval, allow_zero=True)
    _positive("train.max_steps", t.max_steps)
    _positive("train.micro_batch_size", t.micro_batch_size)
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
            f"train.eval_every={t.eval_every} needs evaluation data; set data.eval_fraction (e.g. 0.05) or "
            "data.eval_split, or train.eval_every=0"
        )
    _positive("train.heartbeat_interval_s", t.heartbeat_interval_s)
    _positive("train.heartbeat_timeout_s", t.heartbeat_timeout_s, allow_zero=True)
    if 0 < t.heartbeat_timeout_s < 2 * t.heartbeat_interval_s:
        raise ConfigError(
            f"train.heartbeat_timeout_s={t.heartbeat_timeout_s} is not accepted; expected 0 (off) or at least "
            f"2 x train.heartbeat_interval_s ({2 * t.heartbeat_interval_s})"
        )
    _choice("train.precision", t.precision, PRECISIONS)
    if t.precision == "bf16" and z.stage == 0:
        # DeepSpeed's pipeline engine refuses fp32 gradient accumulation for a bf16 model at ZeRO-0.
        raise ConfigError(
            "train.precision=bf16 is not accepted with zero.stage=0: DeepSpeed would accumulate and reduce "
            "gradients in bf16; accepted: zero.stage=1 (fp32 accumulation), or zero.stage=0 with fp32 or fp16"
        )
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _choice("optim.scheduler", o.scheduler, SCHEDULERS)
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
    return run


def check_attention(run: RunConfig) -> None:
    """One-line errors for flash-attention combinations that fail or silently attend across documents.

    flash-attn kernels take bf16/fp16 only (fp32 fails at the first forward, inside flash-attn). With
    ``data.layout=pack`` HF's flash path keeps the packed documents apart only for a micro-batch of one
    row (it reads their boundaries from the position ids of a single row); with more rows documents
    would attend to each other.
    """
    impl, t = run.model.attn_implementation, run.train
    if "flash" not in impl:
        return
    if t.precision == "fp32":
        raise ConfigError(
            f"model.attn_implementation={impl} is not accepted with train.precision=fp32: flash-attn runs in "
            "bf16/fp16 only; use train.precision=bf16 or model.attn_implementation=sdpa"
        )
    if run.data.layout == "pack" and t.micro_batch_size > 1:
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
