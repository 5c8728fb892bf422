"""Cost models: one price per pipeline layer, for the partitioner and for ``pipefit plan``.

Two models, selected by ``pipeline.partition=``:

- ``flops``: analytic forward and backward FLOPs of each layer from the HF config and the
  micro-batch shape (:func:`layer_flops`), turned into seconds with a hardware description.
- ``profile``: forward and backward time and saved-activation bytes of each *distinct* layer,
  measured on this machine with the real micro-batch shape (:func:`pipefit.partition.profile.profile_layers`), one
  materialised layer at a time, cached on disk.

Both end in :class:`LayerCosts`: per-micro-batch forward/backward seconds per layer, the per-step
work that scales with a layer's parameters (optimizer step, gradient reduction), the seconds a
stage boundary costs per micro-batch, and a 1F1B memory model (:class:`pipefit.partition.balance.StageMemory`).

Constants (documented guesses, not measurements; ``profile`` replaces the compute ones):

- backward = 2 x forward for matmuls (gradient of the input and of the weight), attention and
  element-wise work;
- element-wise FLOPs per element: norm 5, softmax 5, SiLU-gate 5, GELU 8, tanh 8, rotary 3 per rotated
  element, cross-entropy 5 per logit, soft-cap 3 per capped score or logit, residual add 1;
- :data:`OPTIMIZER_BYTES_PER_PARAM` bytes of memory traffic per trainable parameter per step
  for AdamW (read weight, gradient, two moments; write weight and moments; read gradient once more
  for the clipping norm), divided over data-parallel ranks under ZeRO-1;
- gradient all-reduce over ``dp`` ranks moves ``2 (dp-1)/dp`` gradient bytes per rank (ring); the
  tied embedding/head gradient moves its bytes once between the two stages that hold it;
- a stage boundary sends the hidden states (plus int64 position ids) forward and their gradient
  backward, once per micro-batch each, at the hardware's link bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipefit.config import HardwareConfig
from pipefit.model.adapters import for_config
from pipefit.model.tasks import SEQUENCE_CLASSIFICATION, TASKS
from pipefit.partition import memory
from pipefit.partition.balance import StageMemory
from pipefit.partition.memory import DTYPE_BYTES

__all__ = [
    "Hardware",
    "LayerCosts",
    "LayerFlops",
    "ModelShape",
    "Workload",
    "flops_costs",
    "layer_flops",
    "model_flops",
]


BACKWARD_FACTOR = 2.0
NORM_FLOPS_PER_ELEMENT = 5.0
SOFTMAX_FLOPS_PER_ELEMENT = 5.0
GATED_ACT_FLOPS_PER_ELEMENT = 5.0
GELU_FLOPS_PER_ELEMENT = 8.0
TANH_FLOPS_PER_ELEMENT = 8.0  # the pooler's activation, priced like GELU
ROTARY_FLOPS_PER_ELEMENT = 3.0
CROSS_ENTROPY_FLOPS_PER_LOGIT = 5.0
SOFTCAP_FLOPS_PER_ELEMENT = 3.0  # divide, tanh, multiply

OPTIMIZER_BYTES_PER_PARAM = 32.0
POSITION_ID_BYTES = 8


class Hardware(HardwareConfig):
    """One accelerator (or CPU rank) as the planner sees it: the ``hardware`` config plus helpers."""

    @classmethod
    def from_config(cls, hw: Any) -> Hardware:
        return cls(**{f: getattr(hw, f) for f in cls.__dataclass_fields__})

    def achieved_flops(self, precision: str) -> float:
        peak = self.peak_tflops_fp32 if precision == "fp32" else self.peak_tflops_bf16
        return peak * 1e12 * self.matmul_efficiency


@dataclass(frozen=True)
class Workload:
    """What one optimizer step runs: the micro-batch shape, micro-batches, data-parallel degree."""

    seq_len: int
    micro_batch_size: int
    micro_batches: int = 1
    dp: int = 1
    precision: str = "fp32"
    zero_stage: int = 1
    layout: str = "concat"
    reduce_bucket_size: int = 50_000_000

    @classmethod
    def from_run(cls, run: Any, dp: int = 1) -> Workload:
        return cls(
            seq_len=run.data.seq_len,
            micro_batch_size=run.train.micro_batch_size,
            micro_batches=run.train.grad_accum_steps,
            dp=dp,
            precision=run.train.precision,
            zero_stage=run.zero.stage,
            layout=run.data.layout,
            reduce_bucket_size=run.zero.reduce_bucket_size,
        )

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    def state_bytes_per_param(self) -> float:
        """Bytes DeepSpeed holds per trainable parameter at the step (see :mod:`pipefit.partition.memory`)."""
        return memory.state_bytes_per_param(self.precision, self.zero_stage, self.dp)


@dataclass(frozen=True)
class ModelShape:
    """The figures of a HF config (decoder or encoder) that set its FLOPs.

    ``embed_dim`` is the token embedding's (and tied head's) width: the hidden size, except where
    OPT's ``word_embed_proj_dim`` differs and ``project_in``/``project_out`` map between the two.
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool
    vocab: int
    rotary: bool
    embed_dim: int
    rotary_fraction: float = 1.0
    qk_norm: bool = False
    norms_per_block: int = 2
    attn_softcap: bool = False
    final_softcap: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:

        adapter = for_config(cfg)
        hidden = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        inter = (
            getattr(cfg, "intermediate_size", None)
            or getattr(cfg, "n_inner", None)
            or getattr(cfg, "ffn_dim", None)
            or 4 * hidden
        )
        rope = getattr(cfg, "rope_parameters", None)
        fraction = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
        fraction = fraction or getattr(cfg, "partial_rotary_factor", None) or 1.0
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=int(inter),
            gated=adapter.gated_mlp,
            vocab=int(cfg.vocab_size),
            rotary=adapter.rotary is not None,
            embed_dim=int(getattr(cfg, "word_embed_proj_dim", None) or hidden),
            rotary_fraction=float(fraction),
            qk_norm=adapter.qk_norm,
            norms_per_block=adapter.norms_per_block,
            attn_softcap=bool(getattr(cfg, "attn_logit_softcapping", None)),
            final_softcap=adapter.final_logit_softcap(cfg) is not None,
        )


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one layer for one micro-batch, by kind of work; backward is derived."""

    matmul: float = 0.0
    attention: float = 0.0
    elementwise: float = 0.0
    # The embedding's backward is a scatter-add, not twice its (zero) forward.
    backward_override: float | None = None

    @property
    def forward(self) -> float:
        return self.matmul + self.attention + self.elementwise

    @property
    def backward(self) -> float:
        if self.backward_override is not None:
            return self.backward_override
        return BACKWARD_FACTOR * self.forward

    @property
    def total(self) -> float:
        return self.forward + self.backward


def attention_pairs(seq_len: int, causal: bool = True, window: int | None = None) -> int:
    """Query-key pairs one head scores: s^2 in full, s(s+1)/2 causal, fewer with a sliding window."""
    s = seq_len
    if not causal:
        return s * s
    if window is None or window >= s:
        return s * (s + 1) // 2
    w = int(window)
    return w * (w + 1) // 2 + (s - w) * w


def task_name(hf_config: Any) -> str:
    """The task a config trains: causal LM for a decoder family, an encoder's from its ``architectures``."""
    return for_config(hf_config).task(hf_config)


def _head_shape(hf_config: Any, shape: ModelShape, b: int, s: int) -> tuple[int, int]:
    """``(rows, outputs)`` of the task head: per token over the vocabulary (LMs), or per row over labels."""
    if task_name(hf_config) == SEQUENCE_CLASSIFICATION:
        return b, int(hf_config.num_labels)
    return b * s, shape.vocab


def layer_flops(hf_config: Any, layer: Any, seq_len: int, micro_batch_size: int, causal: bool = True) -> LayerFlops:
    """Forward FLOPs of one pipeline layer (:class:`~pipefit.model.layers.LayerInfo`) for one micro-batch.

    ``causal=False`` prices every query-key pair, as an eager attention computes (and as
    ``FlopCounterMode`` counts) before masking; a bidirectional task (an encoder) always does, since
    every token attends to its whole row.
    """

    adapter = for_config(hf_config)
    shape = ModelShape.from_config(hf_config)
    h, e, b, s = shape.hidden, shape.embed_dim, micro_batch_size, seq_len
    tokens = b * s
    held = set(layer.hf_prefixes)
    if layer.kind == "embed":
        # Lookups are free; the backward scatter-adds into the tables. OPT's project_in is a matmul.
        positions = tokens * h if adapter.position_embed in held else 0
        project = 2.0 * tokens * e * h if adapter.project_in in held else 0.0
        # An encoder's whole embedding module adds word, position and token-type rows, then a LayerNorm.
        whole = (2.0 + NORM_FLOPS_PER_ELEMENT) * tokens * h if getattr(adapter, "embeddings", None) in held else 0.0
        return LayerFlops(
            matmul=project,
            elementwise=positions + whole,
            backward_override=BACKWARD_FACTOR * (project + whole) + tokens * e + positions,
        )
    if layer.kind == "transform":  # masked-LM head transform: dense, GELU, LayerNorm
        return LayerFlops(
            matmul=2.0 * tokens * h * h, elementwise=(GELU_FLOPS_PER_ELEMENT + NORM_FLOPS_PER_ELEMENT) * tokens * h
        )
    if layer.kind == "pooler":  # the first token of each row: dense, tanh
        return LayerFlops(matmul=2.0 * b * h * h, elementwise=TANH_FLOPS_PER_ELEMENT * b * h)
    if layer.kind == "norm":
        norm = NORM_FLOPS_PER_ELEMENT * tokens * h if adapter.final_norm in held else 0.0
        project = 2.0 * tokens * h * e if adapter.project_out in held else 0.0
        return LayerFlops(matmul=project, elementwise=norm)
    if layer.kind == "head":
        rows, outputs = _head_shape(hf_config, shape, b, s)
        per_logit = CROSS_ENTROPY_FLOPS_PER_LOGIT + (SOFTCAP_FLOPS_PER_ELEMENT if shape.final_softcap else 0.0)
        return LayerFlops(matmul=2.0 * rows * e * outputs, elementwise=per_logit * rows * outputs)
    causal = causal and not TASKS[task_name(hf_config)].bidirectional
    window = None
    if adapter.attention_kind(hf_config, layer.block_index) == "sliding_attention":
        window = getattr(hf_config, "sliding_window", None)
    pairs = attention_pairs(s, causal, window)
    q, kv, inter = shape.q_dim, shape.kv_dim, shape.intermediate
    projections = 2.0 * tokens * h * (q + 2 * kv) + 2.0 * tokens * q * h
    mlp = (3 if shape.gated else 2) * 2.0 * tokens * h * inter
    attention = 2 * 2.0 * b * shape.heads * shape.head_dim * pairs  # QK^T and PV
    score_flops = SOFTMAX_FLOPS_PER_ELEMENT + (SOFTCAP_FLOPS_PER_ELEMENT if shape.attn_softcap else 0.0)
    elementwise = (
        shape.norms_per_block * NORM_FLOPS_PER_ELEMENT * tokens * h
        + (NORM_FLOPS_PER_ELEMENT * tokens * (q + kv) if shape.qk_norm else 0.0)
        + score_flops * b * shape.heads * pairs
        + (GATED_ACT_FLOPS_PER_ELEMENT if shape.gated else GELU_FLOPS_PER_ELEMENT) * tokens * inter
        + (ROTARY_FLOPS_PER_ELEMENT * tokens * (q + kv) * shape.rotary_fraction if shape.rotary else 0.0)
        + 2.0 * tokens * h  # residual adds
    )
    return LayerFlops(matmul=projections + mlp, attention=attention, elementwise=elementwise)


def model_flops(hf_config: Any, plan: Sequence[Any], seq_len: int, micro_batch_size: int) -> list[LayerFlops]:
    return [layer_flops(hf_config, layer, seq_len, micro_batch_size) for layer in plan]


def activation_bytes(hf_config: Any, layer: Any, workload: Workload) -> float:
    """Estimated bytes one layer saves for backward per micro-batch (``profile`` measures them).

    A block saves about 4 hidden-sized tensors (norm inputs and outputs), 5 query-sized and
    4 key/value-sized ones (projections, rotated copies, attention output) and 4 MLP-sized ones
    (gate, up, activation, product); the head saves its input and the fp32 log-softmax over the
    vocabulary.
    """
    shape = ModelShape.from_config(hf_config)
    tokens = workload.micro_batch_size * workload.seq_len
    e = workload.act_bytes
    if layer.kind == "embed":
        # An encoder's embedding also saves its LayerNorm's input and output.
        whole = getattr(for_config(hf_config), "embeddings", None) in set(layer.hf_prefixes)
        return tokens * (POSITION_ID_BYTES + (2 * shape.hidden * e if whole else 0))
    if layer.kind in ("norm", "transform"):
        return 2 * tokens * shape.hidden * e  # input and output (RMSNorm saves both; a projection its input)
    if layer.kind == "pooler":
        return 2 * workload.micro_batch_size * shape.hidden * e  # the first token and the dense output
    if layer.kind == "head":
        rows, outputs = _head_shape(hf_config, shape, workload.micro_batch_size, workload.seq_len)
        return rows * (shape.embed_dim * e + outputs * 4)
    mlp = 4 if shape.gated else 3
    return tokens * e * (4 * shape.hidden + 5 * shape.q_dim + 4 * shape.kv_dim + mlp * shape.intermediate)


def attention_mask(hf_config: Any, layer: Any, workload: Workload) -> tuple[str, float] | None:
    """``(mask kind, bytes)`` of the dense ``[b, 1, s, s]`` mask a block's stage builds per micro-batch.

    Each stage builds one mask per micro-batch and attention kind, shared by its blocks
    (:class:`pipefit.model.layers.MaskCache`), and autograd keeps it until that micro-batch's backward. HF
    builds none for sdpa over rows of one document (concat: a causal kernel, no mask) unless a
    sliding window is not longer than the row; packed or padded rows (documents found from the position
    ids) get a boolean mask; eager gets an additive one in the compute dtype for every layout; flash
    attention and flex_attention keep no dense mask. None for layers other than blocks.
    """
    if layer.kind != "block":
        return None

    adapter = for_config(hf_config)
    kind = adapter.attention_kind(hf_config, layer.block_index)
    impl = getattr(hf_config, "_attn_implementation", None) or "sdpa"
    b, s = workload.micro_batch_size, workload.seq_len
    if "flash" in impl or impl == "flex_attention":
        return None
    if impl == "eager":
        return kind, float(b * s * s * workload.act_bytes)
    window = getattr(hf_config, "sliding_window", None)
    documents = workload.layout != "concat" and adapter.mask_uses_position_ids
    windowed = kind == "sliding_attention" and window is not None and s >= window  # HF skips s < window
    return (kind, float(b * s * s)) if documents or windowed else None


@dataclass
class LayerCosts:
    """Per-layer prices in seconds, and what the partitioner and simulator need besides.

    ``per_step`` is the per-step work of a layer (optimizer, gradient reduction), ``reduce_s`` the
    gradient communication within it (:func:`reduce_seconds`; empty: none); ``transfer_s``
    the seconds one boundary takes per micro-batch in one direction; ``transfer_busy``: both stages spend
    those seconds (a blocking send and its receive, as gloo's), not only the data's flight time.
    """

    method: str
    forward_s: list[float]
    backward_s: list[float]
    per_step_s: list[float]
    transfer_s: float
    micro_batches: int
    memory: StageMemory
    memory_cap: float
    tied: tuple[int, ...] = ()
    flops: list[LayerFlops] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Per layer: (mask kind, bytes) of the dense attention mask its stage keeps per micro-batch in
    # flight (:func:`attention_mask`), counted once per stage and kind by ``pipefit plan``.
    attention_masks: list[tuple[str, float] | None] = field(default_factory=list)
    transfer_busy: bool = False
    reduce_s: list[float] = field(default_factory=list)
    # CPU contended profile: per layer, the forward and backward seconds with the other ranks idle (the
    # prices above are with every rank computing); empty: none. See pipefit.partition.contention.
    alone_forward_s: list[float] = field(default_factory=list)
    alone_backward_s: list[float] = field(default_factory=list)

    def per_layer(self) -> list[float]:
        """Seconds per optimizer step each layer costs the stage that holds it."""
        m = self.micro_batches
        return [m * (f + b) + w for f, b, w in zip(self.forward_s, self.backward_s, self.per_step_s, strict=True)]

    def boundary_costs(self) -> list[float]:
        """Entry ``b``: seconds per step a cut before layer ``b`` adds to each of its two stages."""
        n = len(self.forward_s)
        cut = 2 * self.micro_batches * self.transfer_s
        return [0.0] + [cut] * (n - 1) + [0.0]


def reduce_seconds(plan: Sequence[Any], workload: Workload, hw: Hardware) -> list[float]:
    """Per layer, the seconds per step of its gradient communication: the all-reduce over ``dp`` ranks and a
    tied weight's exchange between the stages that hold it, at the hardware's link bandwidth."""
    link = hw.link_bandwidth_gbs * 1e9
    grad_bytes = 4  # gradients reduced in fp32 (DeepSpeed's default for pipelines)
    out = []
    for layer in plan:
        t = 0.0
        if workload.dp > 1:
            t += 2 * (workload.dp - 1) / workload.dp * layer.num_params * grad_bytes / link
        if layer.tied:
            t += layer.num_params * grad_bytes / link
        out.append(t)
    return out


def _per_step_seconds(plan: Sequence[Any], workload: Workload, hw: Hardware) -> list[float]:
    mem_bw = hw.memory_bandwidth_gbs * 1e9
    shard = workload.dp if workload.zero_stage >= 1 else 1
    reduce = reduce_seconds(plan, workload, hw)
    return [x.num_params * OPTIMIZER_BYTES_PER_PARAM / shard / mem_bw + r for x, r in zip(plan, reduce, strict=True)]


def _transfer_seconds(hf_config: Any, workload: Workload, hw: Hardware) -> float:
    tokens = workload.micro_batch_size * workload.seq_len
    shape = ModelShape.from_config(hf_config)
    return tokens * (shape.hidden * workload.act_bytes + POSITION_ID_BYTES) / (hw.link_bandwidth_gbs * 1e9)


def flops_costs(hf_config: Any, plan: Sequence[Any], workload: Workload, hw: Hardware) -> LayerCosts:
    """``pipeline.partition=flops``: analytic FLOPs at the hardware's achieved rate."""
    flops = model_flops(hf_config, plan, workload.seq_len, workload.micro_batch_size)
    rate = hw.achieved_flops(workload.precision)
    return LayerCosts(
        method="flops",
        forward_s=[f.forward / rate for f in flops],
        backward_s=[f.backward / rate for f in flops],
        per_step_s=_per_step_seconds(plan, workload, hw),
        reduce_s=reduce_seconds(plan, workload, hw),
        transfer_s=_transfer_seconds(hf_config, workload, hw),
        micro_batches=workload.micro_batches,
        memory=memory.memory_model(plan, workload, [activation_bytes(hf_config, x, workload) for x in plan], hw),
        memory_cap=hw.memory_gib * 2**30,
        tied=tuple(x.index for x in plan if x.tied),
        flops=flops,
        attention_masks=[attention_mask(hf_config, x, workload) for x in plan],
    )
