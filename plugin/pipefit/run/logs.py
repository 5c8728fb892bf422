"""Logging of a run: the console gets pipefit's lines, ``train.log`` everything, libraries' chatter demoted."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

CHATTER = "pipefit.library"  # what libraries print or warn: train.log only, at debug level


class _ToLogFile(logging.Filter):
    """``train.log``: pipefit's records at any level, library chatter, and other libraries' warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("pipefit") or record.levelno >= logging.WARNING


class _ToConsole(logging.Filter):
    """The console: pipefit's own lines only (the plan, steps, the result, its warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "pipefit" or (record.name.startswith("pipefit.") and record.name != CHATTER)


class _Demote(logging.Filter):
    """On a library logger with a console handler of its own (DeepSpeed's ``Setting accelerator to
    CPU``, Python warnings such as DeepSpeed's ``all_gather_into_tensor`` FutureWarning): hand the
    record to pipefit's handlers as debug chatter instead, so it reaches ``train.log`` only."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[{record.name}] {record.getMessage()}"
        record.args = None
        record.levelno, record.levelname, record.name = logging.DEBUG, "DEBUG", CHATTER
        logging.getLogger(CHATTER).handle(record)
        return False


_DEMOTE = _Demote()


_FORMAT = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")


class _ChatterWriter:
    """A ``sys.stdout`` stand-in: libraries' ``print`` lines (DeepSpeed's ``SEED_LAYERS=``, ``Using
    topology``, BF16_Optimizer memory printouts, op builds) become debug records in ``train.log``."""

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                logging.getLogger(CHATTER).debug("%s", line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """While DeepSpeed sets up (process group, ``PipelineModule``, ``deepspeed.initialize``, a resume),
    its ``print`` lines become debug chatter in ``train.log`` (:class:`_ChatterWriter`). Only there:
    ``sys.stdout`` is the real one for the rest of the run (``steps_per_print`` keeps the engine quiet
    while it trains)."""
    with contextlib.redirect_stdout(_ChatterWriter()):  # type: ignore[type-var]
        yield


def quiet_console(rank: int) -> None:
    """Before anything else runs on a rank: rank 0's console shows pipefit's lines only; everything
    else is kept (in memory until ``output_dir`` exists, then in ``train.log``) or, on other ranks,
    dropped (rank 0 holds the same). Idempotent.

    torch's "c10d::broadcast_: an autograd kernel was not registered ... silently incorrect
    behavior" warning, one of those kept out of the console, is harmless here: it comes from
    DeepSpeed's ``PipelineModule._synchronize_tied_weights``, which broadcasts a tied embedding's
    parameter in place when the module is built (and when a checkpoint is loaded), before any
    forward pass uses it. torch records that in-place op with a node that warns in the first
    backward and passes the gradient through unchanged, which is the right gradient for a value
    overwritten before use; the tied GPT-2 pipeline-vs-one-process parity test checks the result.
    """
    import logging.handlers

    root = logging.getLogger()
    if any(getattr(h, "_pipefit", False) for h in root.handlers):
        return
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    logging.getLogger("pipefit").setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for name in ("DeepSpeed", "py.warnings"):
        logging.getLogger(name).addFilter(_DEMOTE)
    with contextlib.suppress(ImportError):
        from datasets.utils import logging as datasets_logging

        datasets_logging.disable_progress_bar()  # both ranks' "Map:" bars
        datasets_logging.get_logger().propagate = True
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.INFO)
        console.addFilter(_ToConsole())
        console.setFormatter(_FORMAT)
        buffer = logging.handlers.MemoryHandler(100_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
        buffer.addFilter(_ToLogFile())
        handlers: list[logging.Handler] = [console, buffer]
    else:
        handlers = [logging.NullHandler()]
    for h in handlers:
        h._pipefit = True  # type: ignore[attr-defined]
        root.addHandler(h)


def setup_logging(output_dir: Path, rank: int) -> None:
    """Rank 0 adds ``output_dir/train.log`` (what the console shows, plus library chatter and
    tracebacks at debug level), starting with what was kept before the folder existed."""
    import logging.handlers

    quiet_console(rank)
    if rank != 0:
        return
    root = logging.getLogger()
    output_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(output_dir / "train.log")
    file_handler.setLevel(logging.DEBUG)
    file_handler.addFilter(_ToLogFile())
    file_handler.setFormatter(_FORMAT)
    file_handler._pipefit = True  # type: ignore[attr-defined]
    for h in list(root.handlers):
        if isinstance(h, logging.handlers.MemoryHandler) and getattr(h, "_pipefit", False):
            h.setTarget(file_handler)
            h.flush()
            root.removeHandler(h)
        elif isinstance(h, logging.FileHandler) and getattr(h, "_pipefit", False):
            root.removeHandler(h)
            h.close()
    root.addHandler(file_handler)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
