"""The layer list of any model: embed + blocks + task head, and everything read from it.

One entry per pipeline layer (:class:`~pipefit.model.layers.LayerInfo`): indices, names, checkpoint
files and partition boundaries all come from it. It is built by one function over the task record
(:data:`pipefit.model.tasks.TASKS`: the embedding, the block and the layers after the blocks, by
class name) and the adapter (the HF prefixes): a decoder's is embed, blocks, final norm, LM head;
an encoder's embed, blocks, then its task head. No consumer asks which family or task it holds.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from pipefit.config import ConfigError, RunConfig
from pipefit.model.adapters import for_config
from pipefit.model.encoder import ClassifierLayer, EncoderBlockLayer, EncoderEmbedLayer, SubmoduleLayer
from pipefit.model.layers import (
    TIED_KEY,
    BlockLayer,
    EmbedLayer,
    HeadLayer,
    LayerInfo,
    ModelSkeleton,
    NormLayer,
    StageLayer,
    TiedHead,
    stage_layers,
    tied_aliases,
)
from pipefit.model.tasks import TASKS, Slot
from pipefit.model.weights import load_weights

__all__ = [
    "TIED_KEY",
    "LayerInfo",
    "build_layers",
    "check_attention",
    "check_run",
    "layer_plan",
    "layer_specs",
    "load_weights",
    "make_skeleton",
    "stage_layers",
    "tied_aliases",
]

log = logging.getLogger("pipefit")

# The stage layers a task may name, by class name.
LAYER_CLASSES: dict[str, type[StageLayer]] = {
    cls.__name__: cls
    for cls in (
        EmbedLayer,
        BlockLayer,
        NormLayer,
        HeadLayer,
        EncoderEmbedLayer,
        EncoderBlockLayer,
        SubmoduleLayer,
        ClassifierLayer,
    )
}


def make_skeleton(hf_config: Any, seed: int = 0) -> ModelSkeleton:
    return ModelSkeleton(hf_config, for_config(hf_config), seed=seed)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _embed_class(skeleton: ModelSkeleton) -> Any:
    return LAYER_CLASSES[TASKS[skeleton.task].embed]


def _entries(skeleton: ModelSkeleton) -> list[tuple[LayerInfo, Slot]]:
    """Each layer with the slot of the task it fills, in pipeline order (see :func:`layer_plan`)."""
    a = skeleton.adapter
    task = TASKS[skeleton.task]
    model = skeleton.model
    tied = a.tied(skeleton.config)
    out: list[tuple[LayerInfo, Slot]] = []

    def add(slot: Slot, prefixes: tuple[str, ...], extra: int = 0, **kw: Any) -> None:
        module_type = type(model.get_submodule(prefixes[0])).__name__ if prefixes else "Identity"
        params = sum(_numel(model.get_submodule(p)) for p in prefixes) + extra
        out.append((LayerInfo(len(out), slot.kind, prefixes, params, (slot.layer, module_type), **kw), slot))

    embed = Slot("embed", task.embed)
    embed_cls = LAYER_CLASSES[task.embed]
    extra = embed_cls.tied_extra_params(skeleton) if tied else 0
    add(embed, embed_cls.planned_prefixes(skeleton, embed), extra, tied=tied)
    for b in range(a.num_blocks(skeleton.config)):
        add(Slot("block", task.block), (a.block_prefix(b),), block_index=b)
    for slot in task.tail:
        if slot.kind == "head" and tied:
            # DeepSpeed counts the module the head's TiedLayerSpec builds: the token embedding (even
            # where a family adds learned positions to it) and the tied tensors outside it (BERT's bias).
            head = (a.embed,)
            params = _numel(model.get_submodule(a.embed)) + embed_cls.tied_extra_params(skeleton)
            info = LayerInfo(len(out), "head", head, params, (task.embed, "TiedHead"), True)
            out.append((info, slot))
        else:
            add(slot, LAYER_CLASSES[slot.layer].planned_prefixes(skeleton, slot))
    return out


def layer_plan(skeleton: ModelSkeleton) -> list[LayerInfo]:
    """The ordered pipeline layers: the task's embedding, each block, then the task's layers after
    the blocks (final norm + LM head; MLM transform + decoder; pooler + classifier).

    A decoder's embedding layer also holds learned positions and an input projection, its norm layer
    an output projection, where the family has them (``hf_prefixes`` lists what each layer holds).
    Figures the partitioner needs (parameter counts, type names) come from the meta-device skeleton,
    so no rank builds a layer it will not own.
    """
    return [info for info, _ in _entries(skeleton)]


def layer_specs(skeleton: ModelSkeleton, device: str = "cpu") -> list[Any]:
    """DeepSpeed layer specs in pipeline order (built lazily, only on the owning stage).

    A tied embedding and head are one ``TiedLayerSpec`` key: DeepSpeed builds the embedding class on
    each stage that holds either and keeps the tied tensors equal across them.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # deepspeed: heavy, imported where specs are made

    embed = _embed_class(skeleton)
    specs: list[Any] = []
    for layer, slot in _entries(skeleton):
        if layer.tied and layer.kind in ("embed", "head"):
            forward = {"forward_fn": embed.head_forward} if layer.kind == "head" else {}
            attrs = embed.tied_weight_attrs(skeleton)
            specs.append(
                TiedLayerSpec(TIED_KEY, embed, skeleton, 0, device, layer.kind, tied_weight_attr=attrs, **forward)
            )
        else:
            cls = LAYER_CLASSES[slot.layer]
            specs.append(LayerSpec(cls, *cls.spec_args(skeleton, layer, slot, device)))
    return specs


def build_layers(skeleton: ModelSkeleton, start: int, stop: int, device: str = "cpu") -> list[nn.Module | Any]:
    """Layers ``[start, stop)`` as callables, in one process (for ``pipefit verify`` and tests).

    A tied head whose embedding is in the same range reuses that module, as DeepSpeed does.
    """
    embed = _embed_class(skeleton)
    shared: nn.Module | None = None
    out: list[Any] = []
    for layer, slot in _entries(skeleton)[start:stop]:
        if layer.kind == "head" and layer.tied:
            module = shared if shared is not None else embed(skeleton, 0, device, "head")
            out.append(TiedHead(module, embed.head_forward))
            continue
        cls = LAYER_CLASSES[slot.layer]
        out.append(cls(*cls.spec_args(skeleton, layer, slot, device)))
        if layer.kind == "embed":
            shared = out[-1]
    return out


def check_attention(run: RunConfig, skeleton: ModelSkeleton) -> None:
    """A bidirectional task's flash path would drop its padding mask (tokens would attend to padding): refused."""
    impl = run.model.attn_implementation or ""  # null picks sdpa or eager
    if TASKS[skeleton.task].bidirectional and "flash" in impl:
        raise ConfigError(
            f"model.attn_implementation={impl} is not accepted for {type(skeleton.config).__name__}: the encoder's "
            "flash path drops its padding mask; use model.attn_implementation=sdpa or eager"
        )


def check_run(run: RunConfig, skeleton: ModelSkeleton) -> None:
    """The model's own input checks of a training run, one line each, before any process group exists.

    The attention (:func:`check_attention`), then ``data.seq_len`` against the positions the model
    has: rows longer than a learned position table would index past it in the first step (an
    error); rotary positions extrapolate (a warning).
    """
    check_attention(run, skeleton)
    limit = getattr(skeleton.config, "max_position_embeddings", None)
    seq_len = run.data.seq_len
    if not isinstance(limit, int) or seq_len <= limit:
        return
    if skeleton.adapter.learned_positions():
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
