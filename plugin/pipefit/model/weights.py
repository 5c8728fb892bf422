"""Hugging Face safetensors <-> stage layers, by name.

Every :class:`~pipefit.model.layers.StageLayer` maps its local submodule names to HF prefixes
(``hf_prefixes``); :func:`hf_state_dict` and :func:`load_layer` both use that one map, so
loading and export can never disagree. Reading opens only the shard files that hold this
stage's tensors and reads only those tensors (``safetensors.safe_open``); nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipefit.model.layers import ModelSkeleton, StageLayer, stage_layers, tied_aliases

log = logging.getLogger("pipefit")

# peft's name of the one adapter pipefit adds (see pipefit.model.lora).
ADAPTER = "default"

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# Written into every exported folder: the mark of a folder an export may replace.
EXPORT_MARKER = "pipefit_export.json"


class ExportDestinationError(ValueError):
    """An export destination that cannot be replaced without losing data; nothing was written."""


class CheckpointError(ValueError):
    """A model folder that cannot be used; the message names the folder and what is missing."""


def check_model_folder(path: str | os.PathLike) -> Path:
    """A local HF folder with ``config.json``; raises one clear line otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model.path={str(path)!r} is not a folder; expected a local Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"model.path={str(path)!r} has no config.json; expected a Hugging Face model folder "
            "(config.json + *.safetensors)"
        )
    return folder


def check_shard(folder: Path, filename: str, shown: str) -> list[str]:
    """The tensor names of one safetensors file, after checking its header and its size.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
    byte range, then the data; a file cut short (an interrupted download or copy) ends before the
    last range. Checked before any rank starts, so a bad shard is one line, not a failure mid-load.
    """
    path = folder / filename
    if not path.is_file():
        raise CheckpointError(f"model.path={shown!r} lacks shard {filename}, which its {INDEX_FILE} names")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header of {n} bytes but the file has {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"model.path={shown!r}: {filename} is not a readable safetensors file ({exc}); re-download or re-save it"
        ) from None
    if 8 + n + end != size:
        raise CheckpointError(
            f"model.path={shown!r}: {filename} is truncated or corrupt ({size} bytes, its header describes "
            f"{8 + n + end}); re-download or re-save it"
        )
    return list(header)


class SafetensorsReader:
    """Reads named tensors from a HF folder (one ``model.safetensors`` or an indexed set of shards)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = check_model_folder(folder)
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.weight_map: dict[str, str] = dict(weight_map)
            for filename in sorted(set(self.weight_map.values())):
                check_shard(self.folder, filename, str(folder))
        elif single.is_file():
            self.weight_map = {k: SINGLE_FILE for k in check_shard(self.folder, SINGLE_FILE, str(folder))}
        else:
            raise CheckpointError(
                f"model.path={str(folder)!r} has no {SINGLE_FILE} or {INDEX_FILE}; pipefit loads safetensors only"
            )

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(
                f"model.path={str(self.folder)!r} lacks {len(missing)} tensor(s) this model needs, e.g. {missing[:3]}"
            )
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for filename, keys in by_file.items():
            with safe_open(self.folder / filename, framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def lora_layers(module: nn.Module) -> dict[str, Any]:
    if "peft" not in sys.modules:  # nothing can be adapted without peft imported
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` under its original HF names: each LoRA adapter merged into its base weight."""
    state = module.state_dict()
    for name, layer in lora_layers(module).items():
        pre = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(pre + "lora_")]:
            del state[key]
        for key in [k for k in state if k.startswith(pre + "base_layer.")]:
            plain = pre + key[len(pre + "base_layer.") :]
            tensor = state.pop(key)
            if plain == pre + "weight":
                with torch.no_grad():
                    tensor = tensor + layer.get_delta_weight(ADAPTER).to(tensor.dtype)
            state[plain] = tensor
    return state


def hf_state_dict(layer: StageLayer) -> dict[str, torch.Tensor]:
    """The layer's persistent tensors under their HF names (LoRA adapters merged into their base weights)."""
    out: dict[str, torch.Tensor] = {}
    for local, prefix in layer.hf_prefixes.items():
        for key, tensor in plain_state_dict(getattr(layer, local)).items():
            out[f"{prefix}.{key}"] = tensor
    return out


def load_layer(layer: StageLayer, reader: SafetensorsReader, renamed: dict[str, str] | None = None) -> None:
    """Fill ``layer`` from the checkpoint, strictly (every tensor present, shapes equal).

    ``renamed`` maps a wanted HF name to the checkpoint's name of the same tensor where the
    checkpoint lacks the wanted one (see :class:`CheckpointNames`).
    """
    aliases = renamed or {}
    for local, prefix in layer.hf_prefixes.items():
        module = getattr(layer, local)
        wanted = {f"{prefix}.{k}": k for k in module.state_dict()}
        names = {n: (n if n in reader.weight_map or n not in aliases else aliases[n]) for n in wanted}
        tensors = reader.read(names.values())
        state = {}
        for hf_name, local_key in wanted.items():
            tensor = tensors[names[hf_name]]
            expected = module.state_dict()[local_key]
            if tensor.shape != expected.shape:
                raise CheckpointError(
                    f"model.path={str(reader.folder)!r}: {hf_name}: checkpoint shape {tuple(tensor.shape)} "
                    f"!= model shape {tuple(expected.shape)}; "
                    "the folder's weights do not match its config.json"
                )
            state[local_key] = tensor.to(expected.dtype)
        module.load_state_dict(state, strict=True)


class CheckpointNames:
    """Where each HF name of the pipeline is found in a checkpoint's ``weight_map``, if anywhere.

    A name is found as itself; through its rename table: the adapter's ``checkpoint_aliases``
    (GPT-NeoX's ``embed_out``) and, for a tied model, the head's name of each tied tensor and the
    reverse (``lm_head.weight`` for the token embedding; BERT's ``cls.predictions.decoder.weight`` and
    ``.bias`` for the word embedding and the output bias); or without the adapter's ``base_prefix``
    (a bare ``BertModel`` folder saves ``embeddings.*``, not ``bert.embeddings.*``).
    """

    def __init__(self, skeleton: ModelSkeleton, weight_map: dict[str, str]) -> None:
        a = skeleton.adapter
        self.present = weight_map
        self.base = f"{a.base_prefix}." if a.base_prefix else None
        self.heads = a.head_prefixes()
        self.aliases = {**dict(a.checkpoint_aliases), **tied_aliases(skeleton)}

    def resolve(self, name: str) -> str | None:
        for candidate in (name, self.aliases.get(name)):
            if candidate is None:
                continue
            if candidate in self.present:
                return candidate
            if self.base and candidate.startswith(self.base) and candidate[len(self.base) :] in self.present:
                return candidate[len(self.base) :]
        return None

    def new_head(self, names: list[str]) -> bool:
        """All of ``names`` belong to a task head and none is in the checkpoint."""
        in_head = all(any(n == h or n.startswith(h + ".") for h in self.heads) for n in names)
        return in_head and all(self.resolve(n) is None for n in names)


def load_weights(module: nn.Module, skeleton: ModelSkeleton, model_path: str | os.PathLike) -> int:
    """Fill every stage layer in ``module`` from a HF folder; returns the number of tensors read.

    Every name is looked up through :class:`CheckpointNames`. Accepted checkpoints: the model's own,
    and for an encoder another task's (``BertForMaskedLM`` weights under a classifier) or the bare
    base model (``BertModel``, saved without the ``bert.`` prefix). A task head the folder lacks
    entirely (the adapter's ``head_prefixes``: pooler, classifier, masked-LM transform or bias) keeps
    its seeded random initialisation -- the same on every rank, whatever the partition -- as
    ``from_pretrained`` initialises missing weights; it is logged. Any other missing tensor is an error.
    """
    reader = SafetensorsReader(model_path)
    names = CheckpointNames(skeleton, reader.weight_map)
    count = 0
    fresh: list[str] = []
    for layer in stage_layers(module):
        loaded: dict[str, str] = {}
        renamed: dict[str, str] = {}
        for local, prefix in layer.hf_prefixes.items():
            wanted = [f"{prefix}.{k}" for k in getattr(layer, local).state_dict()]
            if names.new_head(wanted):
                fresh.extend(wanted)
                continue
            loaded[local] = prefix
            renamed.update({n: r for n in wanted if (r := names.resolve(n)) not in (None, n)})
        view = SimpleNamespace(hf_prefixes=loaded, **{local: getattr(layer, local) for local in loaded})
        load_layer(view, reader, renamed)  # type: ignore[arg-type]
        count += len(hf_state_dict(view))  # type: ignore[arg-type]
    if fresh:
        log.warning(
            "model.path=%s has no %s: a new task head, randomly initialised (seeded by train.seed)",
            model_path,
            ", ".join(sorted(set(fresh))),
        )
    return count


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(out_dir: Path, token: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial-{token}"


def write_shard(tensors: dict[str, torch.Tensor], folder: Path, filename: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(folder / filename), metadata={"format": "pt"})


def finalize_export(
    staging: Path,
    out_dir: Path,
    shard_names: dict[str, list[str]],
    hf_config: Any,
    tokenizer: Any | None,
) -> None:
    """Write index, config and tokenizer into ``staging``, then move it to ``out_dir`` atomically.

    A previous folder at ``out_dir`` is replaced only after the new one is complete; a crash at
    any point leaves either the old folder or the new one, never a mixture.
    """
    weight_map = {name: fname for fname, names in shard_names.items() for name in names}
    total = 0
    for fname in shard_names:
        with safe_open(staging / fname, framework="pt") as f:
            for k in f.keys():
                t = f.get_slice(k)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                total += numel * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}.get(t.get_dtype(), 4)
    (staging / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    hf_config.save_pretrained(staging)
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
    except Exception:  # noqa: BLE001 - a family without generation defaults still exports
        pass
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    _fsync_dir(staging)
    replace_dir(staging, out_dir)


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Put the finished folder ``staging`` at ``out_dir``, replacing any old one by renames only:
    a reader sees the old folder or the new one, never a mix.

    ``staging`` gets the export marker (:data:`EXPORT_MARKER`). ``out_dir`` may be absent, an empty
    folder or a previous export (it holds the marker); anything else is refused with one line and
    left untouched (the staging folder is removed).
    """
    try:
        check_export_destination(out_dir, field="out_dir")
    except ExportDestinationError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / EXPORT_MARKER).write_text(json.dumps({"format": 1, "written_by": "pipefit"}) + "\n")
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
    _fsync_dir(out_dir.parent)


def is_previous_export(folder: Path) -> bool:
    """Whether ``folder`` is a folder pipefit exported (it holds :data:`EXPORT_MARKER`)."""
    return (folder / EXPORT_MARKER).is_file()


def check_export_destination(
    out_dir: str | os.PathLike,
    field: str = "out_dir",
    sources: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> None:
    """Refuse, with one line and before anything is written, an export destination whose replacement
    would lose data: a file, a non-empty folder that is not a previous pipefit export, or a folder
    that is (or holds) one of ``sources`` (``(field name, path)`` pairs: what the export or run reads).
    """
    out = Path(out_dir).expanduser()
    shown = f"{field}={str(out_dir)!r}"
    target = out.resolve()
    for name, src in sources:
        if not src:
            continue
        resolved = Path(src).expanduser().resolve()
        if resolved == target or target in resolved.parents:
            what = "is" if resolved == target else "holds"
            raise ExportDestinationError(
                f"{shown} {what} {name}={str(src)!r}, which this export reads; nothing was written; "
                "give a destination outside it"
            )
    if out.exists() and not out.is_dir():
        raise ExportDestinationError(
            f"{shown} is a file; nothing was written; expected a new folder, an empty one, or a previous "
            f"pipefit export (with {EXPORT_MARKER})"
        )
    if out.is_dir() and not is_previous_export(out):
        entries = sum(1 for _ in out.iterdir())
        if entries:
            raise ExportDestinationError(
                f"{shown} is not empty ({entries} {'entry' if entries == 1 else 'entries'}) and is not a previous "
                f"pipefit export (no {EXPORT_MARKER}); "
                "nothing was written; give a new or empty folder, or move its contents away"
            )
