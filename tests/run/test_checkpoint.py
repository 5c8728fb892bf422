"""Checkpoints: exact resume (real ranks), atomic layout, refusals, and safe loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import saved_model, tiny_hf_config
from launching import compose, metrics, run_recipe, tail
from pipefit.config import validate
from pipefit.run import checkpoint
from pipefit.run.preflight import Prepared


def _state(step: int, **over) -> dict:
    state = {
        "format": checkpoint.FORMAT_VERSION,
        "pipefit_version": "0.1.0",
        "step": step,
        "boundaries": [0, 2, 5],
        "stages": 2,
        "data_parallel": 1,
        "model": {"model_type": "llama", "vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 3},
    }
    state.update(over)
    return state


def _fake_checkpoint(root: Path, step: int, complete: bool = True, **over) -> Path:
    path = root / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps(_state(step, **over)))
    return path


def test_auto_picks_newest_complete_checkpoint_never_a_partial_one(tmp_path: Path):
    root = checkpoint.checkpoint_root(tmp_path)
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    _fake_checkpoint(root, 6, complete=False)  # folder renamed but state not written: impossible, still ignored
    (root / ".partial-step_00000008").mkdir()  # interrupted save
    assert checkpoint.find_checkpoint("auto", tmp_path) == newest
    assert checkpoint.find_checkpoint(str(tmp_path), "/elsewhere") == newest  # a run folder
    assert checkpoint.find_checkpoint(str(root), "/elsewhere") == newest  # its checkpoints folder
    assert checkpoint.find_checkpoint(str(root / "step_00000002"), "/elsewhere") == root / "step_00000002"
    assert checkpoint.find_checkpoint(None, tmp_path) is None
    assert checkpoint.find_checkpoint("auto", tmp_path / "fresh") is None


def test_checkpoint_files_are_checked_by_header_and_size_never_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume's pre-flight reads each file's zip directory only: no rank unpickles files it does not load."""
    ck = tmp_path / "ck"
    ck.mkdir()
    engine = checkpoint.SafeTorchCheckpointEngine()
    engine.save({"w": torch.arange(100_000, dtype=torch.float32)}, str(ck / "layer_00-model_states.pt"))
    engine.save({"w": torch.ones(3)}, str(ck / "layer_01-model_states.pt"))
    good = (ck / "layer_00-model_states.pt").read_bytes()
    assert good[:4] == b"PK\x03\x04"  # pipefit's checkpoints are zip archives (DeepSpeed's default is not)
    loads: list[str] = []
    monkeypatch.setattr(checkpoint, "safe_load", lambda path, *a, **k: loads.append(Path(path).name))
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: loads.append(Path(path).name))
    checkpoint.check_files(ck, 2, False, 1, 1, same_shape=False)
    assert loads == []

    damaged = {
        "cut in the middle, directory intact": (good[:200_000] + good[300_000:], "is truncated or corrupt"),
        "second half lost": (good[: len(good) // 2], "is truncated or corrupt"),
        "not an archive": (b"\x00" * 64, "is not a zip archive"),
    }
    for case, (data, problem) in damaged.items():
        (ck / "layer_00-model_states.pt").write_bytes(data)
        with pytest.raises(checkpoint.CheckpointStateError) as info:
            checkpoint.check_files(ck, 2, False, 1, 1, same_shape=False)
        assert str(info.value) == f"train.resume={str(ck)!r}: layer_00-model_states.pt {problem}", case
    assert loads == []

    # A legacy-format file (earlier pipefit) has no directory: loaded once, safely, and a truncated one refused.
    monkeypatch.undo()
    legacy = ck / "layer_00-model_states.pt"
    torch.save({"w": torch.ones(1000)}, legacy, _use_new_zipfile_serialization=False)
    checkpoint.check_files(ck, 2, False, 1, 1, same_shape=False)
    legacy.write_bytes(legacy.read_bytes()[:2000])
    with pytest.raises(checkpoint.CheckpointStateError) as info:
        checkpoint.check_files(ck, 2, False, 1, 1, same_shape=False)
    assert str(info.value) == f"train.resume={str(ck)!r}: layer_00-model_states.pt is truncated or corrupt"


def test_bad_resume_paths_are_one_line_errors(tmp_path: Path):
    with pytest.raises(
        checkpoint.CheckpointStateError, match=r"train\.resume='.*nothing' holds no complete checkpoint"
    ):
        checkpoint.find_checkpoint(str(tmp_path / "nothing"), tmp_path)
    old = _fake_checkpoint(tmp_path / "ck", 3, format=0, pipefit_version="0.0.1")
    with pytest.raises(checkpoint.CheckpointStateError, match=r"checkpoint format 0 by pipefit '0\.0\.1'"):
        checkpoint.find_checkpoint(str(old), tmp_path)
    corrupt = _fake_checkpoint(tmp_path / "ck2", 3)
    (corrupt / checkpoint.STATE_FILE).write_text('{"format": 1, "st')
    with pytest.raises(checkpoint.CheckpointStateError, match="is corrupt"):
        checkpoint.find_checkpoint(str(corrupt), tmp_path)


def test_checkpoint_of_another_model_or_shape_is_refused(tmp_path: Path):
    cfg = tiny_hf_config("llama")
    ck = _fake_checkpoint(tmp_path, 3)
    state = checkpoint.read_state(ck)
    checkpoint.check_compatible(state, ck, cfg)  # same model: fine
    assert checkpoint.same_shape(state, [0, 2, 5], 2, 1)
    assert not checkpoint.same_shape(state, [0, 1, 3, 5], 3, 1)
    assert not checkpoint.same_shape(state, [0, 2, 5], 2, 2)
    other = tiny_hf_config("gpt2")
    with pytest.raises(
        checkpoint.CheckpointStateError,
        match=r"from a different model \(model_type: checkpoint 'llama' vs model 'gpt2'",
    ):
        checkpoint.check_compatible(state, ck, other)


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


class _SavingEngine:
    """What ``checkpoint.save`` asks of DeepSpeed's engine: write the layer files under ``root/tag``."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "layer_00-model_states.pt").write_bytes(self.payload)


def test_saving_over_an_existing_step_never_loses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A later launch of the same run saves a step that exists: the old one stays until the new one is in place."""
    import os

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from pipefit.config import RunConfig
    from pipefit.model.hf import resolve_tokenizer_path

    record = checkpoint.RunRecord(
        run=RunConfig(),
        boundaries=[0, 7],
        data_parallel=1,
        global_batch_size=16,
        hf_config=tiny_hf_config("llama"),
        tokenizer=AutoTokenizer.from_pretrained(resolve_tokenizer_path(None, None)),
    )
    out = tmp_path / "run"
    old = _fake_checkpoint(checkpoint.checkpoint_root(out), 2)
    (old / "layer_00-model_states.pt").write_bytes(b"old weights")
    real_replace = os.replace

    def failing_replace(src, dst):  # the move of the finished save into place fails (disk full, ...)
        if Path(src).name == ".partial-step_00000002" and Path(dst).name == "step_00000002":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", failing_replace)
            with pytest.raises(OSError, match="No space left"):
                checkpoint.save(_SavingEngine(b"new weights"), record, out, 2, rank=0)
        assert (old / "layer_00-model_states.pt").read_bytes() == b"old weights"
        assert json.loads((old / checkpoint.STATE_FILE).read_text())["pipefit_version"] == "0.1.0"
        assert checkpoint.complete_checkpoints(checkpoint.checkpoint_root(out)) == [old]
        path = checkpoint.save(_SavingEngine(b"new weights"), record, out, 2, rank=0)
    finally:
        dist.destroy_process_group()
    assert path == old and (old / "layer_00-model_states.pt").read_bytes() == b"new weights"
    assert sorted(p.name for p in checkpoint.checkpoint_root(out).iterdir()) == ["latest", "step_00000002"]


def test_loading_never_unpickles_arbitrary_objects(tmp_path: Path):
    engine = checkpoint.SafeTorchCheckpointEngine()
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19", "step": 3}, good)
    assert engine.load(str(good))["step"] == 3
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(evil))


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path: Path):
    """pp=2 x dp=2 (4 ranks), gradient accumulation: 6 steps straight == 3 steps, stop, resume 3 more."""
    folder, _ = saved_model(tmp_path, "llama")
    base = [
        "model=local",
        f"model.path={folder}",
        "data.seq_len=32",
        "train.max_steps=6",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "optim.warmup_steps=2",
        "train.save_every=2",
        "train.keep_last=1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_recipe([*base, f"output_dir={straight}"], num_processes=4)
    assert proc.returncode == 0, tail(proc)
    first = run_recipe([*base, f"output_dir={resumed}", "train.stop_after_steps=3"], num_processes=4)
    assert first.returncode == 0, tail(first)
    ckpts = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(resumed))
    assert [p.name for p in ckpts] == ["step_00000003"]  # keep_last=1 pruned step 2
    assert not (resumed / "hf_model").exists()  # not finished: nothing exported yet
    import shutil

    mid = tmp_path / "step3"
    shutil.copytree(ckpts[0], mid)
    second = run_recipe([*base, f"output_dir={resumed}", "train.resume=auto"], num_processes=4)
    assert second.returncode == 0, tail(second)
    assert "resumed from" in second.stdout + second.stderr

    a = [m["loss"] for m in metrics(straight)]
    b = [m["loss"] for m in metrics(resumed)]
    assert [m["step"] for m in metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    assert b == pytest.approx(a, rel=1e-6, abs=0)
    wa = AutoModelForCausalLM.from_pretrained(straight / "hf_model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "hf_model").state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)

    # pipefit export from the final checkpoint == the run's own export.
    from pipefit.cli import main as cli_main

    assert cli_main(["export", str(resumed), str(tmp_path / "from_ckpt")]) == 0
    wc = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ckpt").state_dict()
    for k in wb:
        torch.testing.assert_close(wc[k], wb[k], atol=0, rtol=0, msg=k)
    assert (tmp_path / "from_ckpt" / "tokenizer.json").is_file()

    # Another pipeline shape resumes the step-3 weights exactly: the first loss after resuming
    # (step 4, computed before any update) equals the uninterrupted run's step-4 loss. The global
    # batch stays 8 sequences (micro 2 x accum 4 x dp 1).
    shapes = {"pp4": (["pipeline.stages=4"], 4), "pp1": (["pipeline.stages=1"], 1)}
    for name, (extra, ranks) in shapes.items():
        out = tmp_path / f"reshaped-{name}"
        over = [o for o in base if not o.startswith("train.grad_accum_steps")]
        over += [*extra, "train.grad_accum_steps=4", f"train.resume={mid}", "train.stop_after_steps=1"]
        over += [f"output_dir={out}"]
        proc = run_recipe(over, num_processes=ranks)
        assert proc.returncode == 0, tail(proc)
        assert "optimizer moments restart from zero" in proc.stdout + proc.stderr
        (first_after,) = metrics(out)
        assert first_after["step"] == 4
        assert first_after["loss"] == pytest.approx(a[3], rel=1e-6, abs=0), (name, first_after, a)

    # ...and its first update starts from those weights (ZeRO-1's fp32 masters are refreshed): the
    # step-4 checkpoint of the pp=1 resume equals HF trained from the step-3 weights for one step,
    # at step 4's batch and learning rate, with fresh AdamW moments.
    from pipefit.parity.reference import train_reference

    assert cli_main(["export", str(mid), str(tmp_path / "mid_hf")]) == 0
    assert cli_main(["export", str(tmp_path / "reshaped-pp1"), str(tmp_path / "pp1_hf")]) == 0
    pp1 = [o for o in base if not o.startswith("train.grad_accum_steps")] + ["train.grad_accum_steps=4"]
    run = validate(compose([*pp1, "pipeline.stages=1", f"output_dir={tmp_path / 'ref'}"]))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "mid_hf", attn_implementation="sdpa")
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    (ref_loss,) = train_reference(reference, run, Prepared(run, 1).batches, 1, start_step=3)
    assert ref_loss == pytest.approx(a[3], rel=1e-6, abs=0)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "pp1_hf").state_dict()
    moved = max(float((reference.state_dict()[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4
    for k, v in reference.state_dict().items():
        # A fresh Adam's first update is lr * g / (|g| + eps): elements whose gradient is near eps
        # move by a few 1e-6 with the summation order (threads); the mean shows the weights'
        # origin (about 1e-9 from the reference, 1e-3 if the update started from other weights).
        diff = (got[k] - v).abs()
        assert float(diff.mean()) <= 1e-7 and float(diff.max()) <= 1e-4, (k, float(diff.mean()), float(diff.max()))


def _real_checkpoint(tmp_path: Path) -> tuple[Path, list[str]]:
    folder, _ = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    overrides = [
        "model=local",
        f"model.path={folder}",
        "data.seq_len=32",
        "train.max_steps=4",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "train.stop_after_steps=1",
        "train.heartbeat_timeout_s=0",
        "pipeline.stages=1",
        f"output_dir={out}",
    ]
    import subprocess
    import sys

    from launching import RECIPE, REPO

    proc = subprocess.run([sys.executable, str(RECIPE), *overrides], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ck,) = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(out))
    return ck, overrides


@pytest.mark.slow
def test_damaged_checkpoints_are_refused_with_one_line_and_nothing_overwritten(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    from launching import RECIPE, REPO

    ck, overrides = _real_checkpoint(tmp_path)
    resume = [o for o in overrides if not o.startswith("output_dir=")]

    def attempt(path: Path) -> str:
        out = tmp_path / f"resume-{path.name}"
        proc = subprocess.run(
            [sys.executable, str(RECIPE), *resume, f"train.resume={path}", f"output_dir={out}"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert not out.exists()
        (line,) = [x for x in proc.stderr.splitlines() if x.startswith("pipefit: error:")]
        return line

    missing = tmp_path / "missing"
    shutil.copytree(ck, missing)
    (missing / "layer_01-model_states.pt").unlink()
    assert "is missing 1 file(s), e.g. layer_01-model_states.pt" in attempt(missing)

    truncated = tmp_path / "truncated"
    shutil.copytree(ck, truncated)
    target = truncated / "layer_02-model_states.pt"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert "layer_02-model_states.pt is truncated or corrupt" in attempt(truncated)

    other_version = tmp_path / "other_version"
    shutil.copytree(ck, other_version)
    state = json.loads((other_version / checkpoint.STATE_FILE).read_text())
    state.update(format=99, pipefit_version="9.0.0")
    (other_version / checkpoint.STATE_FILE).write_text(json.dumps(state))
    assert "checkpoint format 99 by pipefit '9.0.0'" in attempt(other_version)

    other_model = tmp_path / "other_model"
    shutil.copytree(ck, other_model)
    state = json.loads((other_model / checkpoint.STATE_FILE).read_text())
    state["model"]["hidden_size"] = 128
    (other_model / checkpoint.STATE_FILE).write_text(json.dumps(state))
    assert "is from a different model (hidden_size: checkpoint 128 vs model 64)" in attempt(other_model)
    # The original checkpoint is untouched by all of this.
    assert checkpoint.complete_checkpoints(ck.parent) == [ck]


@pytest.mark.slow
def test_kill_during_a_save_leaves_the_previous_checkpoint_as_the_newest(tmp_path: Path):
    """SIGKILL every rank while a checkpoint is being written: resume=auto takes the previous one."""
    import contextlib
    import os
    import signal
    import subprocess
    import time

    from launching import CPU_LAUNCH, RECIPE, REPO, accelerate_bin, run_pids

    folder, _ = saved_model(tmp_path, "llama")
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        root = checkpoint.checkpoint_root(out)
        overrides = [
            "model=local",
            f"model.path={folder}",
            "data.seq_len=32",
            "train.max_steps=1000",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=2",
            "train.save_every=2",
            "train.keep_last=5",
            "train.heartbeat_timeout_s=0",
            f"output_dir={out}",
        ]
        cmd = [accelerate_bin(), "launch", "--config_file", str(CPU_LAUNCH), str(RECIPE), *overrides]
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        partial = None
        deadline = time.time() + 240
        ranks: list[int] = []
        try:
            while time.time() < deadline and proc.poll() is None:
                if not ranks and (out / "metrics.jsonl").exists():
                    ranks = [p for p in run_pids(out) if p != proc.pid]
                found = [p for p in root.glob(".partial-step_*") if p.name != ".partial-step_00000002"]
                if ranks and found and checkpoint.complete_checkpoints(root):
                    partial = found[0]
                    for pid in ranks:  # every rank at once, mid-save
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            for pid in run_pids(out):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        if partial is not None and partial.exists():
            break  # the kill landed inside the save window
    else:
        pytest.fail("never managed to kill a run during a save")

    complete = checkpoint.complete_checkpoints(root)
    saved_step = int(partial.name.split("_")[-1])
    assert complete and int(complete[-1].name.split("_")[1]) == saved_step - 2
    assert checkpoint.find_checkpoint("auto", out) == complete[-1]
    # The survivor really loads: one more step from it.
    resume = [o for o in overrides if not o.startswith("train.max_steps")]
    proc = run_recipe([*resume, "train.max_steps=1000", "train.resume=auto", "train.stop_after_steps=1"])
    assert proc.returncode == 0, tail(proc)
    assert f"resumed from {complete[-1]} at step {saved_step - 2}" in proc.stdout + proc.stderr
