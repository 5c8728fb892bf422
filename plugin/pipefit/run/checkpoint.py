"""Periodic checkpoints through DeepSpeed's ``save_checkpoint``, atomic, and exact resume.

Layout under ``output_dir/checkpoints/``::

    step_00000010/            a complete checkpoint (DeepSpeed's files + pipefit's)
        layer_XX-model_states.pt, mp_rank_XX_model_states.pt, *optim_states.pt   (DeepSpeed)
        rng_rank00000.pt ...  per-rank RNG states (tensors only)
        pipefit_state.json    step, data position, partition, world shape, resolved config, version
    .partial-step_00000012/   a save in progress (or interrupted): never picked
    latest                    name of the newest complete checkpoint (written last, atomically)

A save writes into ``.partial-<tag>``; only when every rank has finished does rank 0 add
``pipefit_state.json`` and rename the folder to ``<tag>``. A crash or SIGKILL during a save thus
leaves the previous complete checkpoint as the newest one. Loading goes through a checkpoint
engine that calls ``torch.load(weights_only=True)``: nothing but tensors and plain containers
is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import pipefit
from pipefit.config import RunConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("pipefit")
STATE_FILE = "pipefit_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1


class CheckpointStateError(ValueError):
    """A checkpoint that cannot be resumed; the message names the folder and the reason."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (partial saves are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointStateError(
            f"train.resume={str(ckpt)!r} is not a complete pipefit checkpoint (no {STATE_FILE})"
        ) from None
    except json.JSONDecodeError as exc:
        raise CheckpointStateError(f"train.resume={str(ckpt)!r}: {STATE_FILE} is corrupt ({exc})") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointStateError(
            f"train.resume={str(ckpt)!r} was written in checkpoint format {state.get('format')!r} by pipefit "
            f"{state.get('pipefit_version')!r}; this pipefit ({pipefit.__version__}) reads format {FORMAT_VERSION}"
        )
    return state


def find_checkpoint(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``train.resume`` designates: ``auto`` (newest complete one in this run, or
    none), a run folder, or one checkpoint folder. A path that holds no complete checkpoint is an error."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        read_state(path)
        return path
    for root in (path, checkpoint_root(path)):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointStateError(
        f"train.resume={resume!r} holds no complete checkpoint; expected a checkpoint folder "
        f"(with {STATE_FILE}), a run folder with checkpoints/, or auto"
    )


def check_compatible(state: dict[str, Any], ckpt: Path, hf_config: Any) -> None:
    """Refuse a checkpoint of another model before any rank starts."""
    mine = {k: getattr(hf_config, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}
    theirs = state.get("model", {})
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise CheckpointStateError(f"train.resume={str(ckpt)!r} is from a different model ({detail})")


def same_shape(state: dict[str, Any], boundaries: list[int], stages: int, dp: int) -> bool:
    """Whether this run has the checkpoint's pipeline shape (then optimizer state resumes too)."""
    return (state.get("boundaries"), state.get("stages"), state.get("data_parallel")) == (boundaries, stages, dp)


class SafeTorchCheckpointEngine:
    """DeepSpeed checkpoint engine whose loads never unpickle arbitrary objects.

    It writes zip archives (DeepSpeed's engine defaults to the legacy format without a
    ``checkpoint.use_zipfile_serialization`` config), which :func:`check_files` verifies from their
    directory alone, without reading the tensors.
    """

    def __new__(cls, config_params: Any = None) -> Any:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        class _Safe(TorchCheckpointEngine):
            def load(self, path: str, map_location: Any = None) -> Any:
                return safe_load(path, map_location)

        engine = _Safe(config_params)
        engine.zipfile_serialization = True
        return engine


def safe_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)``, DeepSpeed's plain data types allowed; a damaged file is one clear error."""
    import pickle
    import zipfile

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointStateError(f"{path} is truncated or corrupt ({str(exc).splitlines()[0]})") from None


def archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete zip archive, or None; reads its header and zip directory only.

    ``torch.save`` writes a zip archive (stored, not compressed): complete means its central
    directory (at the end of the file) opens and every member's local header and data lie inside the
    file. Nothing is unpickled, so a check costs a few kilobytes per file however large the file is,
    and the tensors are read only by the rank that loads them.
    """
    import zipfile

    size = path.stat().st_size
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return "is not a zip archive"
        try:
            with zipfile.ZipFile(fh) as archive:
                for info in archive.infolist():
                    # local header: 30 bytes + name + extra (at most 64 KiB each), then the data
                    fh.seek(info.header_offset + 26)
                    name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
                    end = info.header_offset + 30 + name_len + extra_len + info.compress_size
                    if end > size:
                        return f"is truncated or corrupt ({info.filename} ends at byte {end} of {size})"
        except (zipfile.BadZipFile, OSError, ValueError):
            return "is truncated or corrupt"
    return None


def check_files(ckpt: Path, num_layers: int, tied_head: bool, stages: int, world: int, same_shape: bool) -> None:
    """Every file a resume needs exists and is a complete archive; checked before any rank starts.

    Only headers and zip directories are read (:func:`archive_problem`), never the pickled contents;
    a legacy-format file (pipefit before zip checkpoints) is loaded once, safely, as it has no directory.
    """
    needed = [f"layer_{i:02d}-model_states.pt" for i in range(num_layers - (1 if tied_head else 0))]
    if same_shape:
        needed += [f"mp_rank_{s:02d}_model_states.pt" for s in range(stages)]
        needed += [f"rng_rank{r:05d}.pt" for r in range(world)]
    missing = [n for n in needed if not (ckpt / n).is_file()]
    if missing:
        raise CheckpointStateError(
            f"train.resume={str(ckpt)!r} is missing {len(missing)} file(s), e.g. {', '.join(missing[:3])}"
        )
    for f in sorted(ckpt.glob("*.pt")):
        with f.open("rb") as fh:
            legacy = fh.read(2) == b"\x80\x02"  # pickle protocol 2: torch's pre-zip format
        if legacy:
            # Written by an earlier pipefit: no directory to check, so it is loaded once, safely.
            try:
                safe_load(f, map_location="cpu")
            except CheckpointStateError:
                raise CheckpointStateError(f"train.resume={str(ckpt)!r}: {f.name} is truncated or corrupt") from None
            continue
        problem = archive_problem(f)
        if problem is not None:
            raise CheckpointStateError(f"train.resume={str(ckpt)!r}: {f.name} {problem}")


def _allowed_globals() -> list[Any]:
    """Plain data types DeepSpeed writes into its checkpoint files, and nothing executable."""
    import argparse
    from collections import OrderedDict

    allowed: list[Any] = [OrderedDict, argparse.Namespace, set]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]  # fp16: the (dynamic) loss scale and its counters
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint records of its run beside the engine's files: the config, the pipeline shape,
    the data position's unit, and the HF config and tokenizer saved with it."""

    run: RunConfig
    boundaries: list[int]
    data_parallel: int
    global_batch_size: int
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase


def save(engine: Any, record: RunRecord, output_dir: Path, step: int, rank: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``train.keep_last``. Collective."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    run = record.run
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    staging = root / f".partial-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=staging.name, client_state={"pipefit_step": step}, save_latest=False)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, staging / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    final = root / tag
    if rank == 0:
        state = {
            "format": FORMAT_VERSION,
            "pipefit_version": pipefit.__version__,
            "step": step,
            "data_position": {"next_step": step, "global_batch_size": record.global_batch_size},
            "boundaries": record.boundaries,
            "stages": run.pipeline.stages,
            "data_parallel": record.data_parallel,
            "world_size": dist.get_world_size(),
            "model": {
                k: getattr(record.hf_config, k, None)
                for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
            },
            "config": OmegaConf.to_container(OmegaConf.structured(run)),
        }
        record.hf_config.save_pretrained(staging / "hf_config")
        record.tokenizer.save_pretrained(staging / "tokenizer")
        tmp = staging / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, staging / STATE_FILE)
        replace_step(staging, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, root / "latest")
        keep = run.train.keep_last
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def replace_step(staging: Path, final: Path) -> None:
    """Move the finished save ``staging`` to ``final``. An existing ``final`` (the same run's checkpoint of
    this step, from an earlier launch) is set aside first and removed only once the new one is in place;
    if the move fails it is put back, so a step never goes missing."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = final.with_name(f".replaced-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load(engine: Any, ckpt: Path, rank: int) -> int:
    """Restore model, optimizer, scheduler and RNG from ``ckpt``; returns the step it was saved at."""
    state = read_state(ckpt)
    load_path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointStateError(f"train.resume={str(ckpt)!r}: DeepSpeed found no checkpoint files there")
    rng_file = ckpt / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


def load_layers(module: Any, ckpt: Path) -> None:
    """Fill this rank's layers from the per-layer files of ``ckpt`` (any partition, any dp).

    DeepSpeed saves one file per pipeline layer (``layer_XX-model_states.pt``, XX = index in the
    layer list), so weights move to another pipeline shape unchanged. A tied head on a stage
    without the embedding takes the tied weight from the embedding's file.
    """
    layers: dict[int, Any] = {}
    for name, child in module.named_children():
        if name.isdigit():
            layers[int(name)] = child
    for tied in getattr(module, "tied_modules", {}).values():
        layers.setdefault(-1, tied)  # the tied embedding module; its file is layer_00
    for idx, layer in layers.items():
        path = ckpt / f"layer_{max(idx, 0):02d}-model_states.pt"
        state = safe_load(path, map_location="cpu")
        wanted = layer.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise CheckpointStateError(f"{path} lacks {missing[:3]}: not a checkpoint of this model")
        layer.load_state_dict({k: state[k] for k in wanted}, strict=True)


def load_reshaped(engine: Any, ckpt: Path) -> int:
    """Resume on another pipeline shape: weights exactly, step counter, schedule and data position.

    Optimizer moments are not carried over (ZeRO's flat partitions are tied to the old shape); the
    optimizer restarts from zero moments at the saved step's learning rate.
    """
    state = read_state(ckpt)
    step = int(state["step"])
    load_layers(engine.module, ckpt)
    # ZeRO-1 and the bf16 optimizer keep fp32 masters built at initialisation; they must start from
    # the loaded weights, or the first update would be applied to the initial ones.
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
    engine.global_steps = step
    if engine.lr_scheduler is not None and step:
        # The schedule is a closed form of the step (LambdaLR): jump straight to it.
        engine.lr_scheduler.last_epoch = step - 1
        engine.lr_scheduler.step()
    torch.manual_seed(int(state.get("config", {}).get("train", {}).get("seed", 0)) + step)
    return step


def resume(engine: Any, resume_from: Path | None, same_shape: bool, rank: int) -> int:
    """With ``train.resume``: the checkpoint ``resume_from`` loaded into ``engine`` (whole, or reshaped
    for a new pipeline shape); returns the step to continue after (0 for a fresh run)."""
    if resume_from is None:
        return 0
    if same_shape:
        start = load(engine, resume_from, rank)
        kept = "weights, optimizer state, schedule, RNG, data position"
    else:
        start = load_reshaped(engine, resume_from)
        kept = "weights, schedule, data position (new pipeline shape: optimizer moments restart from zero)"
    if rank == 0:
        log.info("resumed from %s at step %d; kept %s", resume_from, start, kept)
    return start
