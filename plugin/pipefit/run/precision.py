"""Mixed precision: fp32 master weights, values rounded by the cast, and frozen values kept for export."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipefit.model.layer_list import stage_layers
from pipefit.model.weights import CheckpointNames, SafetensorsReader


class FrozenFromFolder:
    """Frozen fp32 values the model folder holds exactly, read again at export instead of kept.

    A frozen parameter has no fp32 master; under bf16/fp16 its exact value serves only the export.
    Where the folder holds that very value (compared when found), the export reads it back one
    layer at a time, rather than the host keeping a copy of the frozen base for the whole run.
    """

    def __init__(self, module: torch.nn.Module, skeleton: Any, folder: str) -> None:
        import re

        self.reader = SafetensorsReader(folder)
        names = CheckpointNames(skeleton, self.reader.weight_map)
        self.candidates: dict[int, str] = {}  # id(param) -> the folder's tensor name, as load_weights resolves it
        for layer in stage_layers(module):
            for local, prefix in layer.hf_prefixes.items():
                for key, param in getattr(layer, local).named_parameters():
                    plain = re.sub(r"(^|[.])base_layer[.]", r"\1", key)  # LoRA wraps the base weight
                    hf = names.resolve(f"{prefix}.{plain}")
                    if hf is not None:
                        self.candidates[id(param)] = hf
        self.names: dict[int, str] = {}  # the frozen parameters read again at export

    def holds(self, param: torch.nn.Parameter) -> bool:
        """Whether the folder holds ``param``'s present value exactly (then it is read again at export)."""
        name = self.candidates.get(id(param))
        if name is None:
            return False
        stored = self.reader.read([name])[name]
        if stored.shape != param.shape or not torch.equal(stored.to(param.device, torch.float32), param.data):
            return False
        self.names[id(param)] = name
        return True

    def values(self, params: Iterable[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
        """The fp32 values of those of ``params`` read again, by ``id(param)``."""
        wanted = {id(p): self.names[id(p)] for p in params if id(p) in self.names}
        read = self.reader.read(set(wanted.values())) if wanted else {}
        return {i: read[n].to(torch.float32) for i, n in wanted.items()}


def rounded_by_cast(
    module: torch.nn.Module, precision: str, writer: bool, folder: FrozenFromFolder | None = None
) -> dict[str, torch.Tensor]:
    """Host copies of the fp32 values that casting to ``precision`` would round, by parameter name.

    bf16/fp16: DeepSpeed casts the parameters, then makes its fp32 master weights from the cast
    copies; :func:`restore_fp32_masters` makes these values the masters instead. Only what is
    needed is kept: a value the cast leaves exact (every weight of a bf16 checkpoint under bf16)
    needs no copy, and a frozen parameter (no master; the copy only serves the export) is kept on
    the data-parallel rank that exports (``writer``) only, and not at all where ``folder`` holds
    it exactly (the export reads it again). Empty under fp32.
    """
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is None:
        return {}
    kept = {}
    for name, param in module.named_parameters():
        if not (param.requires_grad or writer) or param.dtype != torch.float32:
            continue
        # In slices, so the check's temporaries stay small next to a large embedding.
        flat = param.data.reshape(-1)
        if any(not torch.equal(part.to(half).float(), part) for part in flat.split(1 << 20)):
            if not param.requires_grad and folder is not None and folder.holds(param):
                continue
            kept[name] = param.data.to("cpu")
    return kept


def restore_fp32_masters(engine: Any, loaded: dict[str, torch.Tensor]) -> None:
    """Make ``loaded`` (fp32 values by parameter name) the optimizer's fp32 master weights.

    Under bf16/fp16 DeepSpeed would start its masters from the rounded copies; this keeps a loaded
    (or freshly initialised) fp32 model exact. Each rank writes only its own shard: no collective.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in engine.module.named_parameters():
        value = loaded.get(name)
        if value is not None and value.dtype == torch.float32 and param.requires_grad:
            safe_set_full_fp32_param(param, value.to(param.device))


@contextlib.contextmanager
def fp32_parameters(layer: torch.nn.Module, values: dict[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, each parameter of ``layer`` found in ``values`` (by ``id``) holds that fp32 value."""
    swapped = []
    for param in layer.parameters():
        value = values.get(id(param))
        if value is not None:
            swapped.append((param, param.data))
            param.data = value.to(param.device)
    try:
        yield
    finally:
        for param, data in swapped:
            param.data = data


def master_weights(engine: Any, params: Iterable[torch.nn.Parameter] | None = None) -> dict[int, torch.Tensor]:
    """The fp32 master copy of each of ``params`` (default: the whole stage) under bf16/fp16, keyed by
    ``id(param)``, where the masters live (no host copy).

    Collective over each stage's data-parallel group (ZeRO shards the masters): every rank of the
    stage calls it with the same parameters, in the same order; only data-parallel rank 0 (the one
    that writes exports) keeps the result, the others get ``{}``. Empty under fp32, where the
    module's parameters are the masters. Callers ask one layer at a time, so at most one layer's
    masters are held.
    """
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    keep = engine.grid.get_data_parallel_rank() == 0
    out = {}
    for param in engine.module.parameters() if params is None else params:
        full = safe_get_full_fp32_param(param)
        if full is not None and keep:
            out[id(param)] = full.detach()
    return out


def export_dtype(hf_config: Any) -> torch.dtype:
    """The dtype the export writes: the model config's ``dtype`` (fp32 when it names none)."""
    dtype = getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


@dataclass
class KeptValues:
    """What the exporting rank keeps from start-up for an exact export: frozen parameters' loaded
    fp32 values (by ``id``; they have no master) and, under bf16/fp16, the frozen tensors the model
    folder holds (:class:`FrozenFromFolder`)."""

    frozen_fp32: dict[int, torch.Tensor]
    from_folder: FrozenFromFolder | None
