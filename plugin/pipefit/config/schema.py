"""Config schemas, registered in Hydra's ConfigStore, and the one list of each choice they accept.

``conf/config.yaml`` lists ``pipefit_schema`` first in its defaults, so every YAML file and every
command-line override is type-checked against these dataclasses at compose time (a misspelt key
fails there). :func:`validate` then checks the values that depend on each other, before any
process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

PRECISIONS = ("fp32", "bf16", "fp16")
# pipeline.schedule: DeepSpeed's 1F1B, or zero-bubble ZB-H1 (backward split into input and weight
# passes, weight passes deferred into 1F1B's cool-down bubbles; see pipefit.run.zero_bubble).
PIPE_SCHEDULES = ("1f1b", "zb1p")
# pipeline.partition methods priced by a cost model (pipefit.partition.costs, .profile) and solved by min-max.
COST_METHODS = ("flops", "profile")
# optim.scheduler: pipefit's own three (linear warmup, then decay to optim.min_lr_ratio), then every
# name transformers.get_scheduler builds as a function of the update (see scheduler_names()).
SCHEDULERS = ("cosine", "linear", "constant")
SCHEDULER_ALIASES = {"wsd": "warmup_stable_decay"}
# get_scheduler's names that step on a metric (an evaluation loss), not on the update count.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
OPTIMIZER_IMPLS = ("auto", "torch", "fused")
DATA_SOURCES = ("pydoc", "text", "json", "hub")
DATA_LAYOUTS = ("concat", "pack", "pad")
DATA_TEMPLATES = ("chat", "instruction")
# pipeline.stages, train.micro_batch_size, pipeline.activation_checkpoint_interval: chosen at start-up
# by the layout search (pipefit.partition.search) for the launched world and train.global_batch_size.
AUTO = "auto"
AUTO_FIELDS = ("pipeline.stages", "train.micro_batch_size", "pipeline.activation_checkpoint_interval")
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


def scheduler_names() -> tuple[str, ...]:
    """Every accepted ``optim.scheduler``: pipefit's own, transformers' ``SchedulerType`` names, aliases."""
    from transformers import SchedulerType

    hf = [t.value for t in SchedulerType if t.value not in SCHEDULERS + METRIC_SCHEDULERS]
    return (*SCHEDULERS, *hf, *SCHEDULER_ALIASES)


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
    # sdpa, eager, flex_attention, flash_attention_2, ...; null: as from_pretrained picks (sdpa where the
    # family supports it, else eager).
    attn_implementation: str | None = None


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
    # An integer, or auto (with train.global_batch_size): the layout search picks it for the launch.
    stages: Any = 2
    # uniform | parameters | flops | profile | type:REGEX | manual
    partition: str = "flops"
    boundaries: list[int] | None = None
    # 0 (off), k (DeepSpeed recomputes each group of k layers in backward), or auto (the layout search).
    activation_checkpoint_interval: Any = 0
    # 1f1b (DeepSpeed's TrainSchedule) | zb1p (zero-bubble ZB-H1, same training; see PIPE_SCHEDULES)
    schedule: str = "1f1b"


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
    # cosine | linear | constant (pipefit's: warmup, then decay to min_lr_ratio * lr), or any name of
    # transformers.get_scheduler (cosine_with_min_lr, constant_with_warmup, polynomial, wsd, ...).
    scheduler: str = "cosine"
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    # Extra arguments of a transformers schedule, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr,
    # {num_decay_steps: 10} for wsd, {power: 2.0, lr_end: 1e-5} for polynomial.
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    # auto: torch.optim.AdamW on CPU, DeepSpeed's fused Adam on GPUs
    impl: str = "auto"


@dataclass
class TrainConfig:
    max_steps: int = 40
    # An integer, or auto (with train.global_batch_size; grad_accum_steps is then derived).
    micro_batch_size: Any = 4
    grad_accum_steps: int = 4
    # Sequences per optimizer step. Optional: if set, must equal micro_batch_size * grad_accum_steps *
    # data_parallel_size; required by any auto layout field and by pipefit plan --search.
    global_batch_size: int | None = None
    seed: int = 1234
    precision: str = "fp32"
    log_every: int = 1
    # Collective timeout of the process group (a blocked send/recv/all-reduce fails after this).
    dist_timeout_s: int = 300
    # Peer heartbeats: a rank silent for heartbeat_timeout_s is declared lost and every other rank
    # exits non-zero (see pipefit.run.watchdog). 0 disables the watchdog.
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 20.0
    export: bool = True
    # Checkpoints every save_every optimizer steps (0: only when a launch stops early), newest keep_last kept.
    save_every: int = 0
    keep_last: int = 2
    # null: start fresh; auto: newest complete checkpoint in output_dir (fresh if none); or a checkpoint/run path.
    resume: str | None = None
    # An output_dir holding another run is refused; true: that run's files are removed first (see pipefit.run.outputs).
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
    # model.layers.0.*): those tensors keep their loaded values (see pipefit.model.lora).
    freeze: list[str] = field(default_factory=list)
    # Measured timeline: every rank times each pipeline instruction of steps trace_steps=[first, last]
    # (inclusive; null: every step of this launch) and rank 0 writes trace.json (Chrome trace /
    # Perfetto), trace.png and a per-stage breakdown (log, metrics.jsonl, TensorBoard) into trace_dir
    # (null: output_dir). See pipefit.run.trace.
    trace: bool = False
    trace_steps: list[int] | None = None
    trace_dir: str | None = None


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
    # What a rank's memory holds beyond its live tensors (measured; 0 where the measure is the allocator's
    # live bytes, as max_memory_allocated on a GPU): the runtime (GiB) and the host allocator's retained
    # free blocks (bytes per trainable parameter), see pipefit.partition.memory.
    runtime_memory_gib: float = 0.0
    allocator_bytes_per_param: float = 0.0


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
