"""Several nodes: two ``accelerate launch`` processes on loopback act as two machines.

Covers what a cluster run needs from pipefit: equal losses to a single-node run, a clean exit
(process groups destroyed: no abort at interpreter exit), and a bounded, named failure when a
rank is killed mid-run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import saved_model
from launching import REPO, local_run, metrics, run_pids, run_recipe, tail

pytestmark = pytest.mark.slow

LOOPBACK = REPO / "launch" / "loopback_2nodes.sh"
FAIL_BOUND_S = 60


def _overrides(folder: Path, out: Path, steps: int) -> list[str]:
    return local_run(folder, out, steps)


def _loopback(per_node: int, overrides: list[str], **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        ["bash", str(LOOPBACK), str(per_node), *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )


@pytest.mark.parametrize("per_node", [1, 2], ids=["pp2-one-stage-per-node", "pp2xdp2-two-ranks-per-node"])
def test_two_nodes_train_like_one_node_and_exit_cleanly(tmp_path: Path, per_node: int):
    folder, _ = saved_model(tmp_path, "llama")
    steps = 3
    multi_out, single_out = tmp_path / "two_nodes", tmp_path / "one_node"
    proc = _loopback(per_node, _overrides(folder, multi_out, steps))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    assert "terminate called" not in output and "core dumped" not in output.lower()

    single = run_recipe(_overrides(folder, single_out, steps), num_processes=2 * per_node)
    assert single.returncode == 0, tail(single)
    multi_losses = [m["loss"] for m in metrics(multi_out)]
    single_losses = [m["loss"] for m in metrics(single_out)]
    assert len(multi_losses) == steps
    assert multi_losses == pytest.approx(single_losses, rel=1e-6, abs=0)
    import json

    part = json.loads((multi_out / "partition.json").read_text())
    assert len(part["ranks"]) == 2 * per_node and part["data_parallel"] == per_node


def _rank_pid(output_dir: Path, rank: int, timeout: float = 120) -> int:
    """The pid of the training process with RANK=rank whose command line names ``output_dir``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if not any(str(output_dir).encode() in c for c in cmdline) or b"finetune.py" not in b" ".join(cmdline):
                    continue
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
                return int(pid)
        time.sleep(0.5)
    raise AssertionError(f"no training process with RANK={rank} for {output_dir}")


@pytest.mark.parametrize(
    "victim,check_resume",
    [(1, True), (0, False)],
    ids=["kill-rank1", "kill-rank0-store-node"],
)
def test_killed_rank_ends_every_rank_within_bound(tmp_path: Path, victim: int, check_resume: bool):
    folder, _ = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    proc = _loopback(1, [*_overrides(folder, out, steps=100_000), "train.save_every=1", "train.keep_last=2"])
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        pid = _rank_pid(out, victim)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=FAIL_BOUND_S + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise AssertionError(f"still running {FAIL_BOUND_S + 30} s after the kill:\n{output[-6000:]}") from None
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in run_pids(out):  # ranks live in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed <= FAIL_BOUND_S, f"took {elapsed:.1f} s\n{output[-4000:]}"
    survivor = 1 - victim
    named = f"rank {victim} (stage {victim}, data 0)"
    assert (
        f"{named} stopped responding" in output
        or "lost contact with the rendezvous store" in output
        or f"rank {survivor} (stage {survivor}, data 0): " in output
    ), output[-4000:]
    print(f"time to fail after SIGKILL of rank {victim}: {elapsed:.1f} s")

    # The last completed checkpoint survives the failure and resumes (a partial save never counts).
    from pipefit.run import checkpoint

    done = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(out))
    assert done, "no complete checkpoint survived"
    if check_resume:
        step = int(done[-1].name.split("_")[1])
        resumed = run_recipe(
            [*_overrides(folder, out, steps=100_000), "train.resume=auto", "train.stop_after_steps=1"], num_processes=2
        )
        assert resumed.returncode == 0, tail(resumed)
        assert f"resumed from {done[-1]} at step {step}" in resumed.stdout + resumed.stderr
        assert metrics(out)[-1]["step"] == step + 1
