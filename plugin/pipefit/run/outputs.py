"""The run's ``output_dir``, checked before any rank starts: a run never mixes with, or writes over, another.

A folder *holds a run* when it has ``metrics.jsonl`` or a complete checkpoint. A launch may write
into such a folder only when it continues that run, that is when

- it resumes a checkpoint of that folder (``train.resume=auto`` or a path inside it; the
  checkpoint's model is checked against this one), or
- its resolved config equals the folder's ``config.yaml`` in everything but :data:`LAUNCH_FIELDS`
  (a rerun of the same run: same model, data, seed, optimizer, steps and batch), or
- ``train.overwrite_output_dir=true``: the old run's files (:data:`RUN_ENTRIES`) are removed before
  the new run writes anything.

Anything else is refused with one line naming the folder, both runs and the choices.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipefit.config import ConfigError, RunConfig
from pipefit.config.compose import leaves
from pipefit.model.weights import check_export_destination, is_previous_export
from pipefit.run.checkpoint import TAG_RE, checkpoint_root, complete_checkpoints

# What a run writes into output_dir; train.overwrite_output_dir removes these (an export only if it
# carries pipefit's export marker), and nothing else the folder holds.
RUN_ENTRIES = (
    "checkpoints",
    "metrics.jsonl",
    "train.log",
    "config.yaml",
    "ds_config.json",
    "partition.json",
    "tensorboard",
    "trace.json",
    "trace.png",
    "hf_model",
    "hf_adapter",
)
EXPORTS = ("hf_model", "hf_adapter")
# Fields that change how a launch runs or reports, not what it computes: a rerun that differs only
# in these is the same run.
LAUNCH_FIELDS = frozenset(
    {
        "output_dir",
        "train.resume",
        "train.overwrite_output_dir",
        "train.stop_after_steps",
        "train.save_every",
        "train.keep_last",
        "train.log_every",
        "train.progress_bar",
        "train.tensorboard",
        "train.dist_timeout_s",
        "train.heartbeat_interval_s",
        "train.heartbeat_timeout_s",
        "train.export",
        "train.trace",
        "train.trace_steps",
        "train.trace_dir",
    }
)


class OutputDirError(ConfigError):
    """An ``output_dir`` this run cannot write into without losing or mixing data; nothing was written."""


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    p, f = Path(path).expanduser().resolve(), folder.resolve()
    return p == f or f in p.parents


def _check_writable(out: Path, shown: str) -> None:
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{shown} is a file; expected a folder (a new one, or this run's own)")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"{shown} cannot be created: {str(probe)!r} is a file; expected a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "it" if probe == out else repr(str(probe))
        raise OutputDirError(
            f"{shown} is not writable (no write permission on {where}); give a folder you can write to"
        )


def _recorded_config(out: Path, checkpoints: list[Path]) -> dict[str, Any] | None:
    """The folder run's resolved config: its ``config.yaml``, else its newest checkpoint's."""
    from omegaconf import OmegaConf

    recorded = out / "config.yaml"
    if recorded.is_file():
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(recorded))
        except Exception:  # noqa: BLE001 - an unreadable record is no proof of the same run
            return None
        return loaded if isinstance(loaded, dict) else None
    if checkpoints:
        try:
            return json.loads((checkpoints[-1] / "pipefit_state.json").read_text()).get("config")
        except (OSError, ValueError):
            return None
    return None


def _last_step(out: Path, checkpoints: list[Path]) -> int:

    steps = [int(TAG_RE.match(c.name).group(1)) for c in checkpoints]  # type: ignore[union-attr]
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        with metrics.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            for line in reversed(f.read().decode("utf-8", "replace").splitlines()):
                try:
                    steps.append(int(json.loads(line)["step"]))
                    break
                except (ValueError, KeyError, TypeError):
                    continue
    return max(steps, default=0)


def _model(config: dict[str, Any] | None) -> str:
    model = (config or {}).get("model") or {}
    name = model.get("name", "unknown")
    return f"{name} from {model['path']}" if model.get("path") else str(name)


def check_output_dir(run: RunConfig, tokenizer_path: Path | None, resume_from: Path | None) -> None:
    """Every check of ``output_dir`` (and of the export folders in it); raises one line, writes nothing.

    ``tokenizer_path`` and ``resume_from`` (the resolved tokenizer folder and checkpoint) are read by
    the run, so no overwrite or export may remove them.
    """
    from omegaconf import OmegaConf

    out = Path(run.output_dir).expanduser()
    shown = f"output_dir={run.output_dir!r}"
    _check_writable(out, shown)
    if run.train.trace and run.train.trace_dir is not None:
        _check_writable(Path(run.train.trace_dir).expanduser(), f"train.trace_dir={run.train.trace_dir!r}")
    overwrite = run.train.overwrite_output_dir
    reads = [
        ("model.path", run.model.path),
        ("model.tokenizer", str(tokenizer_path) if tokenizer_path else None),
        ("data.path", run.data.path),
        *(("data.data_files", f) for f in run.data.data_files),
        ("train.resume", resume_from),
    ]
    if overwrite:
        for name, src in reads:
            if src and _inside(src, out):
                raise OutputDirError(
                    f"train.overwrite_output_dir=true would delete {name}={str(src)!r}, which this run reads, "
                    f"with the old run in {shown}; accepted: another output_dir, or train.overwrite_output_dir=false"
                )
    if run.train.export:
        exports = ["hf_model", "hf_adapter"] if run.lora.enabled else ["hf_model"]
        for name in exports:
            check_export_destination(out / name, f"the export folder output_dir/{name}", reads)
    if not out.is_dir():
        return
    checkpoints = complete_checkpoints(checkpoint_root(out))
    if not checkpoints and not (out / "metrics.jsonl").is_file():
        return  # no run here yet
    if overwrite:
        return  # the old run is removed by clear_previous_run once every check has passed
    if resume_from is not None and _inside(resume_from, out):
        return  # continuing this folder's run
    mine = OmegaConf.to_container(OmegaConf.structured(run))
    theirs = _recorded_config(out, checkpoints)
    if theirs is None:
        differ = ["config (none recorded in the folder)"]
    else:
        a, b = leaves(theirs), leaves(mine)
        # By section and field (model.hf_config, not each of its keys), what tells two runs apart first.
        fields = {
            ".".join(k.split(".")[:2]) for k in a.keys() | b.keys() if k not in LAUNCH_FIELDS and a.get(k) != b.get(k)
        }
        order = ["model", "data", "train", "optim", "lora"]
        differ = sorted(fields, key=lambda k: (order.index(k.split(".")[0]) if k.split(".")[0] in order else 9, k))
    if not differ:
        return  # a rerun of the same run
    shown_diff = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
    choices = "train.resume=auto to continue it, " if checkpoints else ""
    raise OutputDirError(
        f"{shown} holds another run (model {_model(theirs)}, trained to step {_last_step(out, checkpoints)}) than "
        f"this one (model {_model(mine)}, train.max_steps={run.train.max_steps}), differing in {shown_diff}; "
        f"accepted: {choices}another output_dir, or train.overwrite_output_dir=true to replace it"
    )


def clear_previous_run(run: RunConfig) -> None:
    """``train.overwrite_output_dir=true``: rank 0 removes the old run's files before the new run writes.

    Each entry is first renamed aside (atomic), so another rank still checking the folder sees a
    whole entry or none. Files of the folder that a run does not write are kept.
    """
    out = Path(run.output_dir).expanduser()
    if not run.train.overwrite_output_dir or int(os.environ.get("RANK", "0")) != 0 or not out.is_dir():
        return
    aside = out / f".overwritten-{uuid.uuid4().hex[:8]}"
    for name in RUN_ENTRIES:
        entry = out / name
        if not (entry.exists() or entry.is_symlink()) or (name in EXPORTS and not is_previous_export(entry)):
            continue
        aside.mkdir(exist_ok=True)
        os.replace(entry, aside / name)
    shutil.rmtree(aside, ignore_errors=True)
