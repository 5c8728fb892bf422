"""GPU check: the paths the CPU test suite never takes, in a few minutes on a machine with CUDA.

    python benchmarks/gpu_check.py                 # every check this machine's GPUs allow
    python benchmarks/gpu_check.py --keep DIR      # keep the runs' output folders in DIR

1. ``hardware=auto`` resolves to this GPU's preset, and which AdamW ``optim.impl=auto`` picks;
2. ``pipefit verify`` on CUDA in bf16 (llama_tiny, pp=2): boundary, logits and loss agree with HF;
3. ``pipefit plan pipeline.partition=profile --device cuda``: layers timed on the GPU;
4. one process, pp=1, bf16: a short training run through ``accelerate launch``, losses finite;
5. with two or more GPUs: the same run as pp=2.

Prints one ``PASS``/``FAIL`` line per check and exits 1 if any failed. Without CUDA it prints
``gpu_check: no CUDA device; nothing checked`` and exits 0: what can be checked on a CPU is
checked by the test suite (``tests/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "finetune.py"
LAUNCH = REPO / "launch" / "gpu_single_node.yaml"
TIMEOUT_S = 600
TRAIN = [
    "train.precision=bf16",
    "data.seq_len=64",
    "train.max_steps=3",
    "train.micro_batch_size=2",
    "train.grad_accum_steps=2",
    "optim.warmup_steps=1",
]


def _env() -> dict[str, str]:
    plugin = str(REPO / "plugin")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": plugin if not path else f"{plugin}{os.pathsep}{path}"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()


def check_choices() -> str:
    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.run.ds_config import fused_adam_prebuilt

    hw = validate(compose([])).hardware
    prebuilt, why = fused_adam_prebuilt()
    adam = "DeepSpeed FusedAdam" if prebuilt else "torch.optim.AdamW(fused=True)"
    if hw.name == "auto":
        raise AssertionError("hardware=auto was not resolved")
    return f"hardware=auto -> {hw.name} ({hw.memory_gib} GiB); optim.impl=auto -> {adam} ({why})"


def check_verify() -> str:
    cmd = [sys.executable, "-m", "pipefit.cli", "verify", "pipeline.stages=2", "train.precision=bf16"]
    proc = _run([*cmd, "--device", "cuda", "--tol", "1e-2"])
    if proc.returncode != 0:
        raise AssertionError(_tail(proc))
    return proc.stdout.strip().splitlines()[-2]  # "overall: max |diff| ..."


def check_plan(cache: Path) -> str:
    cmd = [sys.executable, "-m", "pipefit.cli", "plan", "pipeline.partition=profile", "train.precision=bf16"]
    proc = _run([*cmd, "data.seq_len=512", "--device", "cuda", "--json", "--cache-dir", str(cache)])
    if proc.returncode != 0:
        raise AssertionError(_tail(proc))
    report = json.loads(proc.stdout)
    forward = [x["forward_s"] for x in report["layers"]]
    if not all(0 < f < 1 for f in forward):
        raise AssertionError(f"implausible forward times on the GPU: {forward}")
    chosen = report["methods"][report["chosen"]]
    return f"profile on cuda: boundaries {chosen['boundaries']}, predicted step {chosen['predicted_step_s']:.4f} s"


def check_training(out: Path, processes: int, stages: int) -> str:
    launcher = shutil.which("accelerate") or "accelerate"
    cmd = [launcher, "launch", "--config_file", str(LAUNCH), "--num_processes", str(processes), str(RECIPE)]
    proc = _run([*cmd, *TRAIN, f"pipeline.stages={stages}", f"output_dir={out}"])
    if proc.returncode != 0:
        raise AssertionError(_tail(proc))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    if len(losses) != 3 or not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"expected 3 finite losses, got {losses}")
    optimizer = json.loads((out / "ds_config.json").read_text())["optimizer"]["params"]
    step = max(r["step_time_s"] for r in records)
    return f"pp={stages} bf16: losses {[round(x, 4) for x in losses]}, step <= {step:.3f} s, optimizer {optimizer}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the runs' output folders here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing checked")
        return 0
    sys.path.insert(0, str(REPO / "plugin"))
    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pipefit-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    checks = [
        ("choices", check_choices),
        ("verify", check_verify),
        ("plan", lambda: check_plan(work / "profile-cache")),
        ("train pp=1", lambda: check_training(work / "pp1", 1, 1)),
    ]
    if gpus >= 2:
        checks.append(("train pp=2", lambda: check_training(work / "pp2", 2, 2)))
    else:
        print("SKIP train pp=2: one GPU")
    failed = 0
    for name, check in checks:
        t0 = time.time()
        try:
            detail = check()
        except Exception as exc:  # report every check, then fail
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.0f} s): {exc}")
        else:
            print(f"PASS {name} ({time.time() - t0:.0f} s): {detail}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
