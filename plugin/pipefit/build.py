"""Layer list + partition -> this rank's ``PipelineModule``, weights loaded for its stage only.

The layer list (:func:`layer_plan`) is the single source of truth: its order is the pipeline
order, DeepSpeed's layer indices and the partition's coordinates. Figures the partitioner needs
(parameter counts, type names) come from the meta-device skeleton, so no rank builds a layer it
will not own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipefit import balance
from pipefit.adapters import Adapter, for_config
from pipefit.stages import (
    BlockLayer,
    EmbedLayer,
    HeadLayer,
    ModelSkeleton,
    NormLayer,
    StageLayer,
    causal_lm_loss,
    tied_head_forward,
)
from pipefit.weights import SafetensorsReader, check_model_folder

TIED_KEY = "embed"


@dataclass(frozen=True)
class LayerInfo:
    """One pipeline layer as the planner sees it."""

    index: int
    kind: str  # embed | block | norm | head
    hf_prefixes: tuple[str, ...]
    num_params: int
    type_names: tuple[str, ...] = field(default_factory=tuple)
    tied: bool = False
    block_index: int | None = None


def load_hf_config(path: str | None, hf_overrides: dict[str, Any] | None) -> Any:
    """The HF config: from ``path/config.json`` when given, else built from ``hf_overrides`` (needs ``model_type``)."""
    from transformers import AutoConfig

    overrides = dict(hf_overrides or {})
    if path:
        folder = check_model_folder(path)
        overrides.pop("model_type", None)
        return AutoConfig.from_pretrained(folder, **overrides)
    model_type = overrides.pop("model_type", None)
    if not model_type:
        raise ValueError("model.hf_config.model_type is required when model.path is not set (e.g. llama, gpt2)")
    try:
        return AutoConfig.for_model(model_type, **overrides)
    except ValueError as exc:
        raise ValueError(f"model.hf_config.model_type={model_type!r}: {str(exc).splitlines()[0]}") from None


def make_skeleton(hf_config: Any, seed: int = 0) -> ModelSkeleton:
    adapter = for_config(hf_config)
    if adapter.kind == "encoder":  # encoder families (BERT): pipefit.encoder
        from pipefit import encoder

        return encoder.EncoderSkeleton(hf_config, adapter, seed=seed)
    return ModelSkeleton(hf_config, adapter, seed=seed)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_plan(skeleton: ModelSkeleton) -> list[LayerInfo]:
    """The ordered pipeline layers: embedding, each block, final norm, LM head.

    The embedding layer also holds learned positions and an input projection, the norm layer an
    output projection, where the family has them (``hf_prefixes`` lists what each layer holds).
    """
    if skeleton.adapter.kind == "encoder":  # encoder families (BERT): pipefit.encoder
        from pipefit import encoder

        return encoder.layer_plan(skeleton)
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


def boundaries_for(
    skeleton: ModelSkeleton,
    method: str,
    num_stages: int,
    boundaries: list[int] | None,
    workload: Any = None,
    hardware: Any = None,
    layer_costs: Any = None,
) -> list[int]:
    """Stage boundaries for ``pipeline.partition=method``.

    ``flops`` and ``profile`` price the layers with :mod:`pipefit.costs` (pass ``layer_costs``
    already computed, e.g. measured on rank 0 and broadcast, or a ``workload`` and ``hardware`` to
    price them here) and solve :func:`balance.partition_min_max` under ``hardware``'s memory cap.
    """
    plan = layer_plan(skeleton)
    extra: dict[str, Any] = {}
    if method in balance.COST_METHODS:
        if layer_costs is None:
            from pipefit import costs

            if workload is None:
                raise balance.PartitionError(
                    f"pipeline.partition={method} needs the micro-batch shape; "
                    "pass workload=costs.Workload.from_run(run)"
                )
            hw = costs.Hardware.from_config(hardware) if hardware is not None else costs.Hardware()
            layer_costs = costs.price_layers(skeleton, method, workload, hw)
        extra = {
            "costs": layer_costs.per_layer(),
            "memory": layer_costs.memory,
            "memory_cap": layer_costs.memory_cap,
            "boundary_costs": layer_costs.boundary_costs(),
        }
    params = [layer.num_params for layer in plan]
    return balance.resolve_partition(method, num_stages, params, [x.type_names for x in plan], boundaries, **extra)


def layer_specs(skeleton: ModelSkeleton, device: str = "cpu") -> list[Any]:
    """DeepSpeed layer specs in pipeline order (built lazily, only on the owning stage)."""
    if skeleton.adapter.kind == "encoder":  # encoder families (BERT): pipefit.encoder
        from pipefit import encoder

        return encoder.layer_specs(skeleton, device)
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    plan = layer_plan(skeleton)
    specs: list[Any] = []
    for layer in plan:
        if layer.kind == "embed":
            if layer.tied:
                specs.append(
                    TiedLayerSpec(
                        TIED_KEY, EmbedLayer, skeleton, 0, device, "embed", tied_weight_attr=["embed_tokens.weight"]
                    )
                )
            else:
                specs.append(LayerSpec(EmbedLayer, skeleton, 0, device))
        elif layer.kind == "block":
            specs.append(LayerSpec(BlockLayer, skeleton, layer.index, layer.block_index, device))
        elif layer.kind == "norm":
            specs.append(LayerSpec(NormLayer, skeleton, layer.index, device))
        elif layer.tied:
            specs.append(
                TiedLayerSpec(
                    TIED_KEY,
                    EmbedLayer,
                    skeleton,
                    0,
                    device,
                    "head",
                    forward_fn=tied_head_forward,
                    tied_weight_attr=["embed_tokens.weight"],
                )
            )
        else:
            specs.append(LayerSpec(HeadLayer, skeleton, layer.index, device))
    return specs


def build_layers(skeleton: ModelSkeleton, start: int, stop: int, device: str = "cpu") -> list[nn.Module | Any]:
    """Layers ``[start, stop)`` as callables, in one process (for ``pipefit verify`` and tests).

    A tied head whose embedding is in the same range reuses that module, as DeepSpeed does.
    """
    if skeleton.adapter.kind == "encoder":  # encoder families (BERT): pipefit.encoder
        from pipefit import encoder

        return encoder.build_layers(skeleton, start, stop, device)
    plan = layer_plan(skeleton)
    shared: EmbedLayer | None = None
    out: list[Any] = []
    for layer in plan[start:stop]:
        if layer.kind == "embed":
            shared = EmbedLayer(skeleton, 0, device, "embed")
            out.append(shared)
        elif layer.kind == "block":
            out.append(BlockLayer(skeleton, layer.index, layer.block_index, device))
        elif layer.kind == "norm":
            out.append(NormLayer(skeleton, layer.index, device))
        elif layer.tied:
            embed = shared if shared is not None else EmbedLayer(skeleton, 0, device, "head")
            out.append(_TiedHead(embed))
        else:
            out.append(HeadLayer(skeleton, layer.index, device))
    return out


class _TiedHead(nn.Module):
    def __init__(self, embed: EmbedLayer) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tied_head_forward(self.embed, hidden)


def stage_layers(module: nn.Module) -> list[StageLayer]:
    """Distinct :class:`StageLayer` objects held by a module (pipeline or list), in order."""
    seen: dict[int, StageLayer] = {}
    for m in module.modules():
        if isinstance(m, StageLayer) and id(m) not in seen:
            seen[id(m)] = m
    return list(seen.values())


def tied_aliases(skeleton: ModelSkeleton) -> dict[str, str]:
    """HF names that may stand for one another in a checkpoint of a tied model."""
    a = skeleton.adapter
    if not a.tied(skeleton.config):
        return {}
    return {f"{a.embed}.weight": f"{a.lm_head}.weight", f"{a.lm_head}.weight": f"{a.embed}.weight"}


def load_weights(module: nn.Module, skeleton: ModelSkeleton, model_path: str | os.PathLike) -> int:
    """Fill every stage layer in ``module`` from ``model_path``; returns the number of tensors read."""
    if skeleton.adapter.kind == "encoder":  # encoder families (BERT): pipefit.encoder
        from pipefit import encoder

        return encoder.load_weights(module, skeleton, model_path)
    from pipefit.weights import hf_state_dict, load_layer

    reader = SafetensorsReader(model_path)
    aliases = {**dict(skeleton.adapter.checkpoint_aliases), **tied_aliases(skeleton)}
    count = 0
    for layer in stage_layers(module):
        load_layer(layer, reader, aliases)
        count += len(hf_state_dict(layer))
    return count


def build_pipeline_module(
    skeleton: ModelSkeleton,
    boundaries: list[int],
    topology: Any,
    device: str = "cpu",
    activation_checkpoint_interval: int = 0,
) -> Any:
    """This rank's ``PipelineModule`` with exactly ``boundaries`` as its stage split."""
    from deepspeed.pipe import PipelineModule

    class FixedPartitionPipelineModule(PipelineModule):
        # DeepSpeed only knows named partition methods; pipefit computes boundaries itself
        # (validated, and without building every layer on every rank) and installs them here.
        # _partition_layers/_set_bounds are private DeepSpeed API: the version range is pinned
        # in pyproject.toml and tests/test_pipeline_distributed.py checks the resulting bounds.
        def _partition_layers(self, method: str = "uniform") -> None:
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = list(boundaries)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return FixedPartitionPipelineModule(
        layers=layer_specs(skeleton, device),
        topology=topology,
        loss_fn=causal_lm_loss,
        partition_method="pipefit",
        activation_checkpoint_interval=activation_checkpoint_interval,
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in ``path``, as saved.

    A plain ``tokenizers`` file (class ``TokenizersBackend``/``PreTrainedTokenizerFast``, as the
    embedded tokenizer) is loaded as exactly that: ``AutoTokenizer`` would swap in a family's own
    class for some model types (e.g. qwen2) and tokenise differently.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = Path(path) / "tokenizer_config.json"
    if cfg_file.is_file():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (Path(path) / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def resolve_tokenizer_path(model_path: str | None, tokenizer: str | None) -> Path:
    if tokenizer:
        return Path(tokenizer).expanduser()
    if model_path and any(
        (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return Path(model_path)
    return Path(__file__).parent / "assets" / "tokenizer"
