"""Failures a user can meet: found before any rank starts where possible, one line each, and a quiet console."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import saved_model
from launching import compose, local_run
from pipefit.config import ConfigError
from pipefit.model.weights import CheckpointError
from pipefit.run.preflight import prepare


def _prepare(*overrides: str, env: dict[str, str] | None = None):
    return prepare(compose(list(overrides)), list(overrides), env=env or {"WORLD_SIZE": "2"})


def test_truncated_shard_is_refused_before_any_rank_starts(tmp_path: Path):
    folder, _ = saved_model(tmp_path, "llama", max_shard_size="200KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    last = shards[-1]
    size = last.stat().st_size
    last.write_bytes(last.read_bytes()[: size - 1000])
    with pytest.raises(CheckpointError) as err:
        _prepare("model=local", f"model.path={folder}", "data.seq_len=32", f"output_dir={tmp_path / 'out'}")
    assert str(err.value) == (
        f"model.path={str(folder)!r}: {last.name} is truncated or corrupt ({size - 1000} bytes, its header "
        f"describes {size}); re-download or re-save it"
    )
    assert not (tmp_path / "out").exists()


def test_single_file_with_a_cut_header_is_one_line(tmp_path: Path):
    folder, _ = saved_model(tmp_path, "llama")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors is not a readable safetensors file \(header of \d+ bytes but the file has 100 "
        r"bytes\)",
    ):
        _prepare("model=local", f"model.path={folder}", "data.seq_len=32")


def test_seq_len_beyond_learned_positions_is_an_error():
    with pytest.raises(ConfigError) as err:
        _prepare("model=gpt2_tiny", "model.hf_config.n_positions=16", "data.seq_len=32")
    assert str(err.value) == (
        "data.seq_len=32 exceeds the model's 16 learned positions (max_position_embeddings of GPT2Config); "
        "accepted: data.seq_len <= 16"
    )


def test_seq_len_beyond_rotary_positions_is_a_warning(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="pipefit"):
        prepared = _prepare("model.hf_config.max_position_embeddings=16", "data.seq_len=32")
    assert prepared.run.data.seq_len == 32
    assert [r.getMessage() for r in caplog.records if r.name == "pipefit"] == [
        "data.seq_len=32 exceeds the model's max_position_embeddings=16: its positions will extrapolate beyond "
        "the length it was trained for"
    ]


@pytest.mark.parametrize(
    ("block", "instead"), [("optimizer", "optim.*"), ("scheduler", "optim.scheduler/optim.warmup_steps")]
)
def test_deepspeed_file_blocks_are_refused_before_any_rank_starts(tmp_path: Path, block: str, instead: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({block: {"type": "AdamW"}, "zero_optimization": {"stage": 1}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path), "WORLD_SIZE": "2"}
    with pytest.raises(ConfigError) as err:
        _prepare("data.seq_len=32", env=env)
    assert str(err.value) == (
        f"accelerate --deepspeed_config_file={str(path)!r} sets {block!r}; pipefit derives it from the Hydra "
        f"config: remove it from the file and set {instead}"
    )


@pytest.mark.slow
def test_a_ranks_own_error_is_one_line_naming_it_at_once(tmp_path: Path):
    """Stage 1's weights do not fit (found only when that rank loads them): one line naming rank 1,
    not a traceback per rank after the watchdog's wait (heartbeat_timeout_s x 1.5 = 180 s here)."""
    import time

    from safetensors.torch import load_file, save_file

    from launching import run_pids, run_recipe, tail

    folder, _ = saved_model(tmp_path, "llama")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    started = time.monotonic()
    # The norm sits on stage 1 with the split [0, 3, 6] (embedding + 2 blocks | 1 block, norm, head).
    proc = run_recipe(
        local_run(
            folder, out, 3, "train.heartbeat_timeout_s=120", "pipeline.partition=manual", "pipeline.boundaries=[0,3,6]"
        )
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, tail(proc)
    console = proc.stdout + proc.stderr
    (line,) = [x for x in console.splitlines() if x.startswith("pipefit:")]
    assert line == (
        f"pipefit: error: rank 1 (stage 1, data 0): CheckpointError: model.path={str(folder)!r}: model.norm.weight: "
        "checkpoint shape (63,) != model shape (64,); the folder's weights do not match its config.json "
        f"(traceback in {out}/train.log)"
    ), tail(proc)
    assert "[rank1]" not in console and "[rank0]" not in console
    assert elapsed < 90, elapsed  # launch included; the line itself comes at once
    log = (out / "train.log").read_text()
    assert "[rank 1 (stage 1, data 0)] failed:\nTraceback (most recent call last):" in log
    assert run_pids(out) == []


def _interrupt(cmd: list[str], out: Path, after_steps: int) -> tuple[int, str]:
    """Start ``cmd`` in a session of its own, send SIGINT to its process group (as Ctrl-C in a
    terminal does) once ``after_steps`` steps are logged; its exit status and console."""
    import os
    import signal
    import subprocess
    import time

    from launching import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps:
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    console, _ = proc.communicate(timeout=120)
    return proc.returncode, console


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_leaves_no_process(tmp_path: Path):
    import sys

    from launching import CPU_LAUNCH, RECIPE, accelerate_bin, metrics, run_pids

    folder, _ = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    overrides = local_run(folder, out, 1000, "train.save_every=2")
    rc, console = _interrupt(
        [accelerate_bin(), "launch", "--config_file", str(CPU_LAUNCH), str(RECIPE), *overrides], out, 3
    )
    assert run_pids(out) == []
    step = metrics(out)[-1]["step"]
    # The signal may land during step N's save: the newest complete checkpoint is then step N-2's.
    from pipefit.run.checkpoint import complete_checkpoints

    newest = complete_checkpoints(out / "checkpoints")[-1]
    assert step - 2 <= int(newest.name.removeprefix("step_")) <= step
    (line,) = [x for x in console.splitlines() if x.startswith("pipefit:")]
    assert line == (
        f"pipefit: interrupted at step {step}; newest complete checkpoint: {newest}; resume with train.resume=auto"
    ), console
    # What remains is the launcher's own report of the signal (torchrun, in the launcher process).
    assert "KeyboardInterrupt" not in console and "[rank0]" not in console and "[rank1]" not in console
    assert console.count("Traceback (most recent call last)") <= 1
    assert rc != 0

    # One process (no launcher): the rank's own exit status is Ctrl-C's, 130.
    single = tmp_path / "single"
    overrides = local_run(folder, single, 1000, "pipeline.stages=1", "train.heartbeat_timeout_s=0")
    rc, console = _interrupt([sys.executable, str(RECIPE), *overrides], single, 2)
    assert rc == 130, console
    step = metrics(single)[-1]["step"]
    assert console.strip().splitlines()[-1] == (
        f"pipefit: interrupted at step {step}; no complete checkpoint to resume from (train.save_every=0)"
    ), console
    assert "Traceback" not in console


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["optim.lrr=1e-4"],
            "Could not override 'optim.lrr': Key 'lrr' not in 'OptimConfig'; to append to your config use "
            "+optim.lrr=1e-4",
        ),
        (["train=fast"], "In 'config': Could not find 'train/fast'; accepted: default"),
        (
            ["data=json", "data.data_files=rows.jsonl"],
            "Error merging override data.data_files=rows.jsonl: Invalid value assigned: str is not a ListConfig, "
            "list or tuple.",
        ),
    ],
)
def test_hydra_composition_errors_are_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]):
    from launching import CONF
    from pipefit.run.exits import check_overrides

    with pytest.raises(SystemExit) as exit_:
        check_overrides(argv, CONF)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"pipefit: error: {line}\n"
    check_overrides(["optim.lr=1e-4", "model=gpt2_tiny"], CONF)  # good overrides: nothing said
    check_overrides(["--cfg", "job", "optim.lrr=1"], CONF)  # Hydra's own flags: left to Hydra
    assert capsys.readouterr().err == ""


@pytest.fixture
def fresh_logging():
    """Rank 0's logging set up in this process, undone afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, list(logging.getLogger("DeepSpeed").filters))
    for h in saved[0]:
        root.removeHandler(h)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    logging.getLogger("DeepSpeed").filters[:] = saved[2]
    logging.captureWarnings(False)


def test_console_shows_pipefit_lines_and_train_log_keeps_the_chatter(tmp_path: Path, capsys, fresh_logging):
    import warnings

    from tqdm.contrib.logging import logging_redirect_tqdm

    from pipefit.run.logs import _ChatterWriter, quiet_console, setup_logging

    def chatter(n: int) -> None:
        logging.getLogger("pipefit").info("step 1/2 loss 8.0000")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
        warnings.warn(f"all_gather_into_tensor is deprecated ({n})", FutureWarning, stacklevel=1)
        logging.getLogger("transformers.tokenization_utils_base").warning("a tokenizer remark")
        _ChatterWriter().write("SEED_LAYERS=False BASE_SEED=1234\n")

    quiet_console(0)
    chatter(1)  # before output_dir exists: kept in memory
    setup_logging(tmp_path, 0)
    with logging_redirect_tqdm():  # as under the progress bar (a terminal): tqdm's handler keeps the filter
        chatter(2)
    err = capsys.readouterr().err.splitlines()
    assert [x.split("] ", 1)[-1] for x in err] == ["step 1/2 loss 8.0000"] * 2
    log = (tmp_path / "train.log").read_text()
    for line in (
        "[pipefit][INFO] step 1/2 loss 8.0000",
        "[pipefit.library][DEBUG] [DeepSpeed] Setting accelerator to CPU.",
        "[pipefit.library][DEBUG] [py.warnings] ",
        "FutureWarning: all_gather_into_tensor is deprecated",
        "[pipefit.library][DEBUG] SEED_LAYERS=False BASE_SEED=1234",
        "[transformers.tokenization_utils_base][WARNING] a tokenizer remark",
    ):
        assert log.count(line) == 2, (line, log)


def test_library_prints_reach_train_log_only_while_deepspeed_sets_up(tmp_path: Path, capsys, fresh_logging):
    """Inside ``library_prints`` a ``print`` is chatter in ``train.log``; outside it stdout is untouched."""
    from pipefit.run.logs import library_prints, setup_logging

    setup_logging(tmp_path, 0)
    with library_prints():
        print("SEED_LAYERS=False BASE_SEED=1234")
    print("a line printed during training")
    captured = capsys.readouterr()
    assert captured.out == "a line printed during training\n" and captured.err == ""
    log = (tmp_path / "train.log").read_text()
    assert log.count("[pipefit.library][DEBUG] SEED_LAYERS=False BASE_SEED=1234") == 1
    assert "a line printed during training" not in log
