"""Run the real recipe under ``accelerate launch`` (real processes, CPU, gloo), read what it wrote, and
compare it with the single-process reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RECIPE = REPO / "recipes" / "finetune.py"
CPU_LAUNCH = REPO / "launch" / "cpu_2proc.yaml"


def accelerate_bin() -> str:
    return str(Path(sys.executable).with_name("accelerate"))


def run_recipe(
    overrides: list[str],
    num_processes: int = 2,
    launcher_args: list[str] | None = None,
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``accelerate launch [--config_file launch/cpu_2proc.yaml] --num_processes N recipes/finetune.py overrides``."""
    args = launcher_args if launcher_args is not None else ["--config_file", str(CPU_LAUNCH)]
    cmd = [accelerate_bin(), "launch", *args, "--num_processes", str(num_processes), str(RECIPE), *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def local_run(folder: Path, out: Path, steps: int, *extra: str, accum: int = 2, warmup: int = 1) -> list[str]:
    """Overrides for a short run of the saved model in ``folder``: 32-token rows, micro-batches of 2."""
    return [
        "model=local",
        f"model.path={folder}",
        "data.seq_len=32",
        f"train.max_steps={steps}",
        "train.micro_batch_size=2",
        f"train.grad_accum_steps={accum}",
        f"optim.warmup_steps={warmup}",
        f"output_dir={out}",
        *extra,
    ]


def metrics(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def losses_match(output_dir: Path, ref_losses: list[float], steps: int, rel_tol: float = 1e-5) -> float:
    """The run's per-step losses (``metrics.jsonl``) against the reference's: one per step, each within
    ``rel_tol`` of it (relative). Returns the largest relative difference."""
    pipe_losses = [m["loss"] for m in metrics(output_dir)]
    assert len(pipe_losses) == steps
    rel = [abs(a - b) / abs(b) for a, b in zip(pipe_losses, ref_losses, strict=True)]
    assert max(rel) <= rel_tol, (pipe_losses, ref_losses)
    return max(rel)


def weights_match(exported: Any, reference: Any, initial: Any) -> None:
    """The exported model holds the reference's trained weights, and those moved well beyond the tolerance."""
    import torch

    ref_sd, exp_sd, init_sd = reference.state_dict(), exported.state_dict(), initial.state_dict()
    assert set(ref_sd) == set(exp_sd)
    assert max(float((ref_sd[k] - init_sd[k]).abs().max()) for k in ref_sd) > 1e-3
    for k in ref_sd:
        torch.testing.assert_close(exp_sd[k], ref_sd[k], atol=2e-5, rtol=1e-4, msg=k)


# In-process configs write nowhere; without an output_dir of their own they point at a folder that does
# not exist, never at the repository's outputs/ (where the README's first command leaves a run).
UNUSED_OUTPUT_DIR = Path(tempfile.gettempdir()) / f"pipefit-tests-no-output-{uuid.uuid4().hex[:8]}"


def compose(overrides: list[str]) -> Any:
    from pipefit.cli import compose as pipefit_compose

    if not any(o.lstrip("+").startswith("output_dir=") for o in overrides):
        overrides = [*overrides, f"output_dir={UNUSED_OUTPUT_DIR}"]
    return pipefit_compose(overrides, str(CONF))


def tail(proc: subprocess.CompletedProcess[str], n: int = 4000) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-n:]}\nstderr:\n{proc.stderr[-n:]}"


def run_pids(output_dir: Path) -> list[int]:
    """Every process of a run (launcher and ranks): command lines naming the recipe and ``output_dir``.

    Killing the launcher's process group is not enough: torchrun starts the ranks in sessions of
    their own.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"finetune.py" in cmdline and f"output_dir={output_dir}".encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def require_precision(precision: str, accelerator: object = None) -> None:
    """Skip the calling test, with pipefit's own one-line reason, where this machine's DeepSpeed
    accelerator cannot train in ``precision`` (pipefit refuses it there, rightly: DeepSpeed's CPU
    accelerator has fp16 only where oneDNN has fp16 kernels for the CPU)."""
    import pytest

    from pipefit.config import ConfigError
    from pipefit.run.ds_config import check_precision

    try:
        check_precision(precision, accelerator)
    except ConfigError as exc:
        pytest.skip(str(exc))
