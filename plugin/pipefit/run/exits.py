"""How a rank ends: one line per failure (naming the rank), its exit status, Ctrl-C, bad input.

Exit statuses: 2 bad input (before any process group), 1 a rank's own error, 3 a lost peer
(named by the watchdog), 130 Ctrl-C (with where to resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch.distributed as dist
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from pipefit.config import RunConfig
from pipefit.config.compose import compose
from pipefit.run import checkpoint

log = logging.getLogger("pipefit")


class InterruptFlag:
    """Within the block, SIGINT (Ctrl-C, which reaches every rank) is remembered before it raises
    ``KeyboardInterrupt``: a rank whose collective then fails because a peer stopped first knows
    it was interrupted, not broken."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective or point-to-point failure, the way a lost peer first shows."""
    if isinstance(exc, dist.DistError | ConnectionError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")
    )


def _say(line: str) -> None:
    """One line on the console (stderr, which the launcher passes through) and in ``train.log``."""
    print(line, file=sys.stderr, flush=True)
    log.debug("%s", line)


def end_rank(exc: BaseException, interrupted: bool, watchdog: Any, run: RunConfig, rank: int, me: str) -> int:
    """How a rank ends after ``exc`` (its exit status), saying at most one line.

    Ctrl-C: rank 0 says where the run stopped (130). A peer that reported its own failure: this
    rank's error is only the echo of it; end quietly (1). A communication error with no failed
    peer: a peer may be gone; the watchdog names it within its timeout (3). Anything else is this
    rank's own error: one line naming the rank, at once (1). The traceback goes to ``train.log``.
    """
    detail = "".join(traceback.format_exception(exc))
    if interrupted or isinstance(exc, KeyboardInterrupt):
        if rank == 0:
            _say(f"pipefit: {interrupted_line(run)}")
        log.debug("rank %d interrupted in:\n%s", rank, detail)
        return 130
    if watchdog is not None:
        if watchdog.failed_peer() is None and _is_communication_error(exc):
            deadline = time.monotonic() + run.train.heartbeat_timeout_s * 1.5
            while time.monotonic() < deadline and watchdog.verdict is None and watchdog.failed_peer() is None:
                time.sleep(min(0.1, run.train.heartbeat_interval_s))
            if watchdog.verdict is not None:
                return 3
        if watchdog.failed_peer() is not None:
            log.debug("%s stopped after rank %d failed:\n%s", me, watchdog.failed_peer(), detail)
            return 1
        watchdog.mark_failed()
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _say(f"pipefit: error: {me}: {type(exc).__name__}: {message} (traceback in {run.output_dir}/train.log)")
    _append_traceback(Path(run.output_dir), me, detail)
    return 1


def _append_traceback(output_dir: Path, me: str, detail: str) -> None:
    """The failing rank's traceback in ``train.log`` (rank 0 through its log; others append)."""
    if logging.getLogger().handlers and any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
        log.debug("%s failed:\n%s", me, detail)
        return
    with contextlib.suppress(OSError):
        if output_dir.is_dir():
            with (output_dir / "train.log").open("a") as f:
                f.write(f"[{me}] failed:\n{detail}")


def interrupted_line(run: RunConfig) -> str:
    """``interrupted at step N; newest complete checkpoint: ...`` from what rank 0 has written."""

    output_dir = Path(run.output_dir)
    step = 0
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
        step = int(json.loads(lines[-1])["step"])
    newest = None
    with contextlib.suppress(ValueError, OSError):
        newest = checkpoint.find_checkpoint("auto", output_dir)
    if newest is None:
        saving = f"train.save_every={run.train.save_every}"
        return f"interrupted at step {step}; no complete checkpoint to resume from ({saving})"
    return f"interrupted at step {step}; newest complete checkpoint: {newest}; resume with train.resume=auto"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story (printed as one line). pipefit's own input errors
    (ConfigError, PartitionError, UnknownFamilyError, CheckpointError, CheckpointStateError) are
    all ValueErrors."""
    return (ValueError, FileNotFoundError)


def user_error_exit(message: str) -> None:
    """Rank 0 prints ``pipefit: error: message``; every rank exits 2. The other ranks, which find the
    same error, let rank 0 say it once before the launcher, seeing the first exit, stops the rest."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pipefit: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    raise SystemExit(2)


def composition_error_line(exc: BaseException) -> str:
    """Hydra's multi-line composition error (a typo'd key, an unknown preset, a value of the wrong
    type) as one line: what failed, why, and what is accepted."""
    lines = [x.strip().rstrip(".") for x in str(exc).splitlines() if x.strip()]
    options = getattr(exc, "options", None)
    if options:
        return f"{lines[0]}; accepted: {', '.join(options)}"
    cause = str(exc.__cause__ or "").strip().splitlines()
    line = lines[0] + (f": {cause[0]}" if cause else "")
    for extra in lines[1:]:
        line += f"; {extra[0].lower()}{extra[1:]}"
    return line


def check_overrides(argv: list[str], config_dir: str | os.PathLike) -> None:
    """Compose the recipe's config from plain ``key=value`` arguments before Hydra does, so that an
    error in them is one line (exit 2) rather than Hydra's report. Arguments with Hydra flags or
    ``hydra.*`` keys are left to Hydra."""
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra.") for a in argv):
        return
    try:
        compose(argv, str(config_dir))
    except (HydraException, OmegaConfBaseException) as exc:
        user_error_exit(composition_error_line(exc))
