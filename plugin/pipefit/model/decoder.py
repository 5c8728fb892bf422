"""The decoder (causal LM) layer list: embed, blocks, final norm, LM head (tied or not).

The layer list (:func:`layer_plan`) is the single source of truth: its order is the pipeline
order, DeepSpeed's layer indices and the partition's coordinates. Figures the partitioner needs
(parameter counts, type names) come from the meta-device skeleton, so no rank builds a layer it
will not own. :mod:`pipefit.model.layer_list` chooses this or :mod:`pipefit.model.encoder`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from pipefit.config import ConfigError, RunConfig
from pipefit.model.adapters import Adapter
from pipefit.model.layers import (
    BlockLayer,
    EmbedLayer,
    HeadLayer,
    LayerInfo,
    ModelSkeleton,
    NormLayer,
    stage_layers,
    tied_aliases,
    tied_head_forward,
)
from pipefit.model.weights import SafetensorsReader, hf_state_dict, load_layer

log = logging.getLogger("pipefit")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_plan(skeleton: ModelSkeleton) -> list[LayerInfo]:
    """The ordered pipeline layers: embedding, each block, final norm, LM head.

    The embedding layer also holds learned positions and an input projection, the norm layer an
    output projection, where the family has them (``hf_prefixes`` lists what each layer holds).
    """
    a: Adapter = skeleton.adapter
    cfg = skeleton.config
    model = skeleton.model
    tied = a.tied(cfg)
    embed_prefixes = tuple(p for p in (a.embed, a.project_in, a.position_embed) if skeleton.has(p))
    embed_params = sum(_numel(model.get_submodule(p)) for p in embed_prefixes)
    layers = [
        LayerInfo(
            0, "embed", embed_prefixes, embed_params, ("EmbedLayer", type(model.get_submodule(a.embed)).__name__), tied
        )
    ]
    for b in range(a.num_blocks(cfg)):
        prefix = a.block_prefix(b)
        block = model.get_submodule(prefix)
        layers.append(
            LayerInfo(
                len(layers), "block", (prefix,), _numel(block), ("BlockLayer", type(block).__name__), block_index=b
            )
        )
    norm_prefixes = tuple(p for p in (a.final_norm, a.project_out) if skeleton.has(p))
    norm_params = sum(_numel(model.get_submodule(p)) for p in norm_prefixes)
    norm_type = type(model.get_submodule(norm_prefixes[0])).__name__ if norm_prefixes else "Identity"
    layers.append(LayerInfo(len(layers), "norm", norm_prefixes, norm_params, ("NormLayer", norm_type)))
    if tied:
        # DeepSpeed counts the module each TiedLayerSpec builds; the head's (role="head") holds
        # only the token embedding, even where a family adds learned positions to the embedding.
        head_params = _numel(model.get_submodule(a.embed))
        layers.append(LayerInfo(len(layers), "head", (a.embed,), head_params, ("EmbedLayer", "TiedHead"), True))
    else:
        head = model.get_submodule(a.lm_head)
        layers.append(LayerInfo(len(layers), "head", (a.lm_head,), _numel(head), ("HeadLayer", type(head).__name__)))
    return layers


# What pipefit.model.layer_list's one spec/build path needs from this layer list: the embedding's
# class (a tied head shares it), the tied head's forward, the tied tensors, and each layer's class.
EMBED_LAYER = EmbedLayer
TIED_HEAD_FORWARD = tied_head_forward


def tied_weight_attrs(skeleton: ModelSkeleton) -> list[str]:
    return ["embed_tokens.weight"]


def layer_args(skeleton: ModelSkeleton, layer: LayerInfo, device: str) -> tuple[type[nn.Module], tuple[Any, ...]]:
    """Class and arguments of a layer (a tied head aside: the layer list builds it on the embedding)."""
    if layer.kind == "embed":
        return EmbedLayer, (skeleton, 0, device)
    if layer.kind == "block":
        return BlockLayer, (skeleton, layer.index, layer.block_index, device)
    if layer.kind == "norm":
        return NormLayer, (skeleton, layer.index, device)
    return HeadLayer, (skeleton, layer.index, device)


def load_weights(module: nn.Module, skeleton: ModelSkeleton, model_path: str | os.PathLike) -> int:
    """Fill every stage layer in ``module`` from ``model_path``; returns the number of tensors read."""
    reader = SafetensorsReader(model_path)
    aliases = {**dict(skeleton.adapter.checkpoint_aliases), **tied_aliases(skeleton)}
    count = 0
    for layer in stage_layers(module):
        load_layer(layer, reader, aliases)
        count += len(hf_state_dict(layer))
    return count


def check_run(run: RunConfig, skeleton: ModelSkeleton) -> None:
    """``data.seq_len`` against the positions the model has: rows longer than a learned position table
    would index past it in the first step (an error here); rotary positions extrapolate (a warning).
    (The encoder's :func:`pipefit.model.encoder.check_run` checks its own table.)"""
    limit = getattr(skeleton.config, "max_position_embeddings", None)
    seq_len = run.data.seq_len
    if not isinstance(limit, int) or seq_len <= limit:
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
