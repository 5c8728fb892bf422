"""The layer list of any model: embed + blocks + task head, and everything read from it.

One entry per pipeline layer (:class:`~pipefit.model.layers.LayerInfo`): indices, names, checkpoint
files and partition boundaries all come from it. Decoders (causal LM) build it in
:mod:`pipefit.model.decoder`, encoders with task heads (masked LM, classification) in
:mod:`pipefit.model.encoder`; :data:`LAYER_LISTS` maps each task to its builder, and everything
here reads that table (no consumer asks which family or task it holds).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from torch import nn

from pipefit.config import RunConfig
from pipefit.model import decoder, encoder
from pipefit.model.adapters import for_config
from pipefit.model.layers import TIED_KEY, LayerInfo, ModelSkeleton, TiedHead, stage_layers, tied_aliases
from pipefit.model.tasks import CAUSAL_LM, MASKED_LM, SEQUENCE_CLASSIFICATION

__all__ = [
    "TIED_KEY",
    "LayerInfo",
    "build_layers",
    "check_run",
    "layer_plan",
    "layer_specs",
    "load_weights",
    "make_skeleton",
    "stage_layers",
    "tied_aliases",
]


# Each task's layer list: the decoder's (embed, blocks, final norm, LM head) or the encoder's
# (embed, blocks, its task head); each module gives layer_plan, layer_args (each layer's class),
# EMBED_LAYER, TIED_HEAD_FORWARD and tied_weight_attrs (the tied head), load_weights and check_run.
# layer_specs and build_layers below are the one path that turns them into layers.
LAYER_LISTS: dict[str, ModuleType] = {CAUSAL_LM: decoder, MASKED_LM: encoder, SEQUENCE_CLASSIFICATION: encoder}
# The meta-device model of an adapter's kind (an encoder's reads its task from the config).
SKELETONS: dict[str, type[ModelSkeleton]] = {"decoder": ModelSkeleton, "encoder": encoder.EncoderSkeleton}


def _builder(skeleton: ModelSkeleton) -> ModuleType:
    return LAYER_LISTS[skeleton.task]


def make_skeleton(hf_config: Any, seed: int = 0) -> ModelSkeleton:
    adapter = for_config(hf_config)
    return SKELETONS[adapter.kind](hf_config, adapter, seed=seed)


def layer_plan(skeleton: ModelSkeleton) -> list[LayerInfo]:
    """The ordered pipeline layers (see :func:`pipefit.model.decoder.layer_plan`)."""
    return _builder(skeleton).layer_plan(skeleton)


def layer_specs(skeleton: ModelSkeleton, device: str = "cpu") -> list[Any]:
    """DeepSpeed layer specs in pipeline order (built lazily, only on the owning stage).

    A tied embedding and head are one ``TiedLayerSpec`` key: DeepSpeed builds the embedding class on
    each stage that holds either and keeps the tied tensors equal across them.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # deepspeed: heavy, imported where specs are made

    parts = _builder(skeleton)
    specs: list[Any] = []
    for layer in layer_plan(skeleton):
        if layer.tied and layer.kind in ("embed", "head"):
            forward = {"forward_fn": parts.TIED_HEAD_FORWARD} if layer.kind == "head" else {}
            attrs = parts.tied_weight_attrs(skeleton)
            specs.append(
                TiedLayerSpec(
                    TIED_KEY, parts.EMBED_LAYER, skeleton, 0, device, layer.kind, tied_weight_attr=attrs, **forward
                )
            )
        else:
            cls, args = parts.layer_args(skeleton, layer, device)
            specs.append(LayerSpec(cls, *args))
    return specs


def build_layers(skeleton: ModelSkeleton, start: int, stop: int, device: str = "cpu") -> list[nn.Module | Any]:
    """Layers ``[start, stop)`` as callables, in one process (for ``pipefit verify`` and tests).

    A tied head whose embedding is in the same range reuses that module, as DeepSpeed does.
    """
    parts = _builder(skeleton)
    shared: nn.Module | None = None
    out: list[Any] = []
    for layer in layer_plan(skeleton)[start:stop]:
        if layer.kind == "head" and layer.tied:
            embed = shared if shared is not None else parts.EMBED_LAYER(skeleton, 0, device, "head")
            out.append(TiedHead(embed, parts.TIED_HEAD_FORWARD))
            continue
        cls, args = parts.layer_args(skeleton, layer, device)
        out.append(cls(*args))
        if layer.kind == "embed":
            shared = out[-1]
    return out


def load_weights(module: nn.Module, skeleton: ModelSkeleton, model_path: str | os.PathLike) -> int:
    """Fill every stage layer in ``module`` from ``model_path``; returns the number of tensors read."""
    return _builder(skeleton).load_weights(module, skeleton, model_path)


def check_run(run: RunConfig, skeleton: ModelSkeleton) -> None:
    """The task's own input checks of a training run (positions, attention, partition), before any rank."""
    _builder(skeleton).check_run(run, skeleton)
