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
from pipefit.model.layers import TIED_KEY, LayerInfo, ModelSkeleton, stage_layers, tied_aliases
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
# (embed, blocks, its task head); each module gives layer_plan, layer_specs, build_layers,
# load_weights and check_run.
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
    """DeepSpeed layer specs in pipeline order (built lazily, only on the owning stage)."""
    return _builder(skeleton).layer_specs(skeleton, device)


def build_layers(skeleton: ModelSkeleton, start: int, stop: int, device: str = "cpu") -> list[nn.Module | Any]:
    """Layers ``[start, stop)`` as callables, in one process (for ``pipefit verify`` and tests)."""
    return _builder(skeleton).build_layers(skeleton, start, stop, device)


def load_weights(module: nn.Module, skeleton: ModelSkeleton, model_path: str | os.PathLike) -> int:
    """Fill every stage layer in ``module`` from ``model_path``; returns the number of tensors read."""
    return _builder(skeleton).load_weights(module, skeleton, model_path)


def check_run(run: RunConfig, skeleton: ModelSkeleton) -> None:
    """The task's own input checks of a training run (positions, attention, partition), before any rank."""
    _builder(skeleton).check_run(run, skeleton)
