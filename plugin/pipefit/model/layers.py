"""Generic pipeline layers that wrap Hugging Face submodules.

Every layer owns real HF submodules (the very classes ``from_pretrained`` builds), taken from
a meta-device skeleton of the HF model and materialised one layer at a time, so a rank never
allocates layers outside its stage. What crosses a stage boundary is ``(hidden, position_ids)``:
the float hidden states and the integer position ids. Attention masks and rotary embeddings
are rebuilt inside each block from the integer tensors; a float mask never travels.

Each layer records ``hf_prefixes``: its local submodule name -> HF parameter prefix. Loading
and export both read that one map (see :mod:`pipefit.model.weights`).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipefit.model.adapters import Adapter
from pipefit.model.tasks import Slot, auto_class, check_task_config

# Label of a position that is not trained (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100


def _check_attn_implementation(hf_config: Any, task: str) -> None:
    """A one-line error for ``sdpa`` on a family HF builds without it (Gemma-2: soft-capped scores)."""
    impl = getattr(hf_config, "_attn_implementation", None)
    if impl != "sdpa":
        return
    model_cls = auto_class(task)._model_mapping.get(type(hf_config), None)
    if model_cls is not None and not getattr(model_cls, "_supports_sdpa", True):
        raise ValueError(
            f"model.attn_implementation='sdpa' is not supported by {model_cls.__name__}; "
            "accepted for this family: eager (or flex_attention, flash_attention_2 where installed)"
        )


def float32_model(build: Any, hf_config: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """``build(*args, dtype=torch.float32, **kwargs)``: a HF model with float32 parameters.

    HF builds in ``config.dtype`` (bf16 for most released checkpoints) and sets that field to the
    dtype it was asked for; ``hf_config`` keeps the folder's dtype, the one an export writes.
    """
    saved_dtype = getattr(hf_config, "dtype", None)
    try:
        return build(*args, dtype=torch.float32, **kwargs)
    finally:
        hf_config.dtype = saved_dtype


class ModelSkeleton:
    """The task's HF model built on the meta device: structure and config, no storage.

    The task (``adapter.task``: a causal LM, or an encoder's head named by ``architectures``) picks
    the HF auto class. Layers deep-copy their submodules out of it and materialise them on the
    target device. The skeleton's ``_init_weights`` gives each materialised submodule HF's own
    random init. Parameters are float32 whatever the folder's ``config.dtype`` (a bf16 checkpoint
    loads into them exactly): the run's precision decides what DeepSpeed trains in, not the checkpoint.

    ``masks`` is the :class:`MaskCache` the blocks built from this skeleton share;
    ``one_document_per_row`` is set for ``data.layout=concat`` (see :class:`BlockLayer`).
    """

    def __init__(self, hf_config: Any, adapter: Adapter, seed: int = 0) -> None:
        self.adapter = adapter
        self.seed = seed
        self.task = adapter.task(hf_config)
        check_task_config(hf_config, self.task)
        _check_attn_implementation(hf_config, self.task)
        with torch.device("meta"):
            self.model = float32_model(auto_class(self.task).from_config, hf_config, hf_config)
        self.config = self.model.config
        self.masks = MaskCache()
        self.one_document_per_row = False

    def has(self, prefix: str | None) -> bool:
        """Whether the HF model has submodule ``prefix`` (OPT builds ``project_in`` only when needed)."""
        if not prefix:
            return False
        try:
            self.model.get_submodule(prefix)
        except AttributeError:
            return False
        return True

    def materialize(self, prefix: str, device: torch.device | str, seed_offset: int) -> nn.Module:
        """A real copy of submodule ``prefix``, randomly initialised as HF initialises it.

        The seed depends only on ``seed_offset`` (the layer index), so a stage's weights do not
        depend on which other layers share its rank.
        """
        module = copy.deepcopy(self.model.get_submodule(prefix)).to_empty(device=device)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 100_003 + seed_offset)
        try:
            with torch.no_grad():
                # Children first, as HF initialises: a parent's special init (GPT-2's scaled
                # c_proj) must win over its children's generic one.
                module.apply(self.model._init_weights)
        finally:
            torch.random.set_rng_state(generator_state)
        return module


class StageLayer(nn.Module):
    """Base class: a pipeline layer made of named HF submodules.

    Its class methods tell the layer list (:mod:`pipefit.model.layer_list`) what a layer holds
    before it is built: the HF prefixes, and the arguments DeepSpeed's ``LayerSpec`` builds it with.
    """

    hf_prefixes: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.hf_prefixes = {}

    @classmethod
    def planned_prefixes(cls, skeleton: ModelSkeleton, slot: Slot) -> tuple[str, ...]:
        """The HF prefixes the layer of ``slot`` holds: the adapter's ``slot.field``."""
        return (getattr(skeleton.adapter, slot.field),)

    @classmethod
    def spec_args(cls, skeleton: ModelSkeleton, layer: LayerInfo, slot: Slot, device: str) -> tuple[Any, ...]:
        """The constructor's arguments for ``layer`` (its entry in the layer list, from ``slot``)."""
        return (skeleton, layer.index, device)

    def adopt(self, local_name: str, module: nn.Module, hf_prefix: str) -> None:
        setattr(self, local_name, module)
        self.hf_prefixes[local_name] = hf_prefix


def _part_seed(layer_index: int, part: int) -> int:
    """Seed offset of a layer's extra submodule (OPT's projections), distinct from every layer's own."""
    return layer_index + part * 1_000_003


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)``, in the order HF's Gemma-2 computes it; ``cap=None`` is the identity."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def tied_head_forward(embed: EmbedLayer, hidden: torch.Tensor) -> torch.Tensor:
    """LM head that reuses the token embedding's weight (``TiedLayerSpec`` forward_fn), soft-capped where HF is."""
    return softcap(F.linear(hidden, embed.embed_tokens.weight), embed.final_logit_softcap)


class EmbedLayer(StageLayer):
    """Token embedding: ``(input_ids, position_ids)`` -> ``(hidden, position_ids)``.

    As the HF forward: tokens (HF's embedding module, so Gemma's scaling is its own), then the
    input projection (OPT), plus learned positions looked up at ``position_ids + offset``, then
    dropout. With tied embeddings this module is shared through ``TiedLayerSpec`` with the LM
    head; a rank that only holds the head builds it with ``role="head"`` and so allocates only
    the tied weight.
    """

    # A tied head is this layer built with role="head", applied by head_forward; tied_weight_attrs
    # names what DeepSpeed keeps equal, tied_extra_params the tied tensors outside its modules.
    head_forward = staticmethod(tied_head_forward)

    @staticmethod
    def tied_weight_attrs(skeleton: ModelSkeleton) -> list[str]:
        return ["embed_tokens.weight"]

    @staticmethod
    def tied_extra_params(skeleton: ModelSkeleton) -> int:
        return 0

    @classmethod
    def planned_prefixes(cls, skeleton: ModelSkeleton, slot: Slot) -> tuple[str, ...]:
        """The token embedding, and the input projection and learned positions where the family has them."""
        a = skeleton.adapter
        return tuple(p for p in (a.embed, a.project_in, a.position_embed) if skeleton.has(p))

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, device: str = "cpu", role: str = "embed") -> None:
        super().__init__()
        adapter = skeleton.adapter
        self.adopt("embed_tokens", skeleton.materialize(adapter.embed, device, layer_index), adapter.embed)
        self.final_logit_softcap = adapter.final_logit_softcap(skeleton.config)
        self.position_offset = adapter.position_offset
        self.position_embed = None
        self.project_in = None
        self.dropout = None
        if role == "embed":
            if skeleton.has(adapter.project_in):
                proj = skeleton.materialize(adapter.project_in, device, _part_seed(layer_index, 1))
                self.adopt("project_in", proj, adapter.project_in)
            if adapter.position_embed:
                pos = skeleton.materialize(adapter.position_embed, device, layer_index)
                self.adopt("position_embed", pos, adapter.position_embed)
            if adapter.embed_dropout:
                self.dropout = copy.deepcopy(skeleton.model.get_submodule(adapter.embed_dropout)).to_empty(
                    device=device
                )

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, position_ids = inputs
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.position_embed is not None:
            # The plain lookup: OPT's module adds its offset inside a forward that takes a mask first.
            hidden = hidden + nn.Embedding.forward(self.position_embed, position_ids + self.position_offset)
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        return hidden, position_ids


class TiedHead(nn.Module):
    """A tied head built in one process (``build_layers``): the embedding layer it shares, applied by the
    same ``forward_fn`` that the ``TiedLayerSpec`` gives DeepSpeed (decoder LM head, masked-LM decoder)."""

    def __init__(self, embed: nn.Module, forward_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.embed = embed
        self.forward_fn = forward_fn

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(self.embed, hidden)


class MaskCache:
    """The attention mask of the micro-batch in flight, built once per stage rather than once per block.

    HF's mask builders find packed documents from the position ids with a host sync (transformers'
    ``masking_utils.find_packed_sequence_indices`` ends in ``.all()`` on a device tensor; the encoder's
    :func:`pipefit.model.encoder.document_mask` likewise), once per block per micro-batch, again in an
    activation-checkpoint recompute. Every block of a stage receives the same position-id tensor
    object (each returns it unchanged; DeepSpeed clones a stage's inputs per micro-batch), so one
    entry per (mask kind, shape, dtype, device), keyed by that object (weakly) and its version
    counter, serves the stage's other blocks: the same mask, one sync per micro-batch.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[Any, ...], tuple[Any, int, Any]] = {}

    def get(self, kind: str, hidden: torch.Tensor, position_ids: torch.Tensor, build: Callable[[], Any]) -> Any:
        key = (kind, tuple(hidden.shape), hidden.dtype, hidden.device)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is position_ids and entry[1] == position_ids._version:
            return entry[2]
        mask = build()
        self._entries[key] = (weakref.ref(position_ids), position_ids._version, mask)
        return mask


class BlockLayer(StageLayer):
    """One HF decoder block; rebuilds its attention mask and rotary embedding from position ids.

    ``skeleton.one_document_per_row`` (set for ``data.layout=concat``, whose rows are one stretch of
    text with positions ``0..s-1``) leaves the position ids out of the mask builder: it would find no
    packed document, after a host sync, and build the same mask.
    """

    @classmethod
    def spec_args(cls, skeleton: ModelSkeleton, layer: LayerInfo, slot: Slot, device: str) -> tuple[Any, ...]:
        return (skeleton, layer.index, layer.block_index, device)

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, block_index: int, device: str = "cpu") -> None:
        super().__init__()
        adapter = skeleton.adapter
        self.config = skeleton.config
        self.attention_kind = adapter.attention_kind(skeleton.config, block_index)
        self.mask_uses_position_ids = adapter.mask_uses_position_ids and not skeleton.one_document_per_row
        self.masks = skeleton.masks
        prefix = adapter.block_prefix(block_index)
        self.adopt("block", skeleton.materialize(prefix, device, layer_index), prefix)
        # Rotary tables hold only non-persistent buffers: never saved, never loaded.
        self.rotary = skeleton.materialize(adapter.rotary, device, layer_index) if adapter.rotary else None

    def _mask(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        make = create_sliding_window_causal_mask if self.attention_kind == "sliding_attention" else create_causal_mask
        # As the HF forward calls it: OPT's leaves out the position ids (no packed-document detection).
        positions = position_ids if self.mask_uses_position_ids else None
        return self.masks.get(
            self.attention_kind,
            hidden,
            position_ids,
            lambda: make(
                config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
            ),
        )

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, position_ids = inputs
        kwargs: dict[str, Any] = {"attention_mask": self._mask(hidden, position_ids), "position_ids": position_ids}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, position_ids)
        out = self.block(hidden, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        return out, position_ids


class NormLayer(StageLayer):
    """Final norm, then the output projection (OPT): ``(hidden, position_ids)`` -> ``hidden``.

    Either part is skipped where the HF model has none (OPT without ``do_layer_norm_before``
    has no final norm); with neither, the layer only drops the position ids.
    """

    @classmethod
    def planned_prefixes(cls, skeleton: ModelSkeleton, slot: Slot) -> tuple[str, ...]:
        a = skeleton.adapter
        return tuple(p for p in (a.final_norm, a.project_out) if skeleton.has(p))

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, device: str = "cpu") -> None:
        super().__init__()
        adapter = skeleton.adapter
        self.norm = None
        self.project_out = None
        if skeleton.has(adapter.final_norm):
            self.adopt("norm", skeleton.materialize(adapter.final_norm, device, layer_index), adapter.final_norm)
        if skeleton.has(adapter.project_out):
            proj = skeleton.materialize(adapter.project_out, device, _part_seed(layer_index, 1))
            self.adopt("project_out", proj, adapter.project_out)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, _ = inputs
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class HeadLayer(StageLayer):
    """Untied LM head: ``hidden`` -> ``logits``, soft-capped where the HF model soft-caps them (Gemma-2)."""

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, device: str = "cpu") -> None:
        super().__init__()
        prefix = skeleton.adapter.lm_head
        self.adopt("lm_head", skeleton.materialize(prefix, device, layer_index), prefix)
        self.final_logit_softcap = skeleton.adapter.final_logit_softcap(skeleton.config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(hidden), self.final_logit_softcap)


def causal_lm_loss(logits: torch.Tensor, labels: Any) -> torch.Tensor:
    """Token-summed cross-entropy times a per-micro-batch scale (the pipeline's ``loss_fn``).

    ``labels`` is ``(target_ids, scale)``: targets are already shifted (position t holds token t+1,
    ``-100`` where nothing is predicted) and ``scale = micro_batches * dp / target_tokens_in_global_batch``.
    DeepSpeed averages micro-batch losses over gradient-accumulation steps and data-parallel ranks,
    so the optimised quantity is exactly ``sum(token losses) / target_tokens_in_global_batch`` --
    the token-weighted mean over the whole global batch, as one process computes it.
    """
    targets, scale = labels
    summed = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed * scale.reshape(()).to(summed.dtype)


TIED_KEY = "embed"


@dataclass(frozen=True)
class LayerInfo:
    """One pipeline layer as the planner sees it."""

    index: int
    kind: str  # embed | block | norm | transform | pooler | head (the task's Slot kinds)
    hf_prefixes: tuple[str, ...]
    num_params: int
    type_names: tuple[str, ...] = field(default_factory=tuple)
    tied: bool = False
    block_index: int | None = None


def stage_layers(module: nn.Module) -> list[StageLayer]:
    """Distinct :class:`StageLayer` objects held by a module (pipeline or list), in order."""
    seen: dict[int, StageLayer] = {}
    for m in module.modules():
        if isinstance(m, StageLayer) and id(m) not in seen:
            seen[id(m)] = m
    return list(seen.values())


def tied_aliases(skeleton: ModelSkeleton) -> dict[str, str]:
    """HF names that may stand for one another in a checkpoint of a tied model (both directions)."""
    a = skeleton.adapter
    if not a.tied(skeleton.config):
        return {}
    pairs = a.tied_names()
    return {**dict(pairs), **{head: embed for embed, head in pairs}}
