"""Bad inputs: one clear line, a non-zero exit, nothing written; and ``pipefit verify``'s verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipefit.model.layers
from conftest import saved_model
from launching import RECIPE, REPO
from pipefit.cli import main as cli_main


def _recipe(overrides: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RECIPE), *overrides], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def no_weights_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("config_only")
    from conftest import tiny_hf_config

    tiny_hf_config("llama").save_pretrained(folder)
    return folder


BAD_INPUTS = {
    "missing model folder": (
        ["model=local", "model.path=/nonexistent/model"],
        "model.path='/nonexistent/model' is not a folder",
    ),
    "folder without config.json": (["model=local", "model.path={empty}"], "has no config.json"),
    "folder without weights": (
        ["model=local", "model.path={noweights}", "pipeline.stages=1"],
        "has no model.safetensors",
    ),
    "unknown family": (
        ["model.hf_config.model_type=t5"],
        "model family T5Config is not supported; supported HF config classes: BertConfig, GPT2Config, GPTNeoXConfig",
    ),
    "stages > layers": (["pipeline.stages=9"], "pipeline.stages=9 exceeds the 7 pipeline layers"),
    "zero 2 with pipelines": (["zero.stage=2"], "zero.stage=2 cannot be combined with pipeline.stages=2"),
    "zero 3 with pipelines": (
        ["zero.stage=3", "pipeline.stages=4"],
        "zero.stage=3 cannot be combined with pipeline.stages=4",
    ),
    "batch arithmetic": (
        ["pipeline.stages=1", "train.global_batch_size=30"],
        "train.global_batch_size=30 != train.micro_batch_size (4) x train.grad_accum_steps (4) x "
        "data-parallel size (1) = 16",
    ),
    "unknown partition method": (
        ["pipeline.partition=profile2"],
        "pipeline.partition='profile2' is not accepted; "
        "accepted: uniform, parameters, flops, profile, type:REGEX, manual",
    ),
    "unsorted boundaries": (
        ["pipeline.partition=manual", "pipeline.boundaries=[0,5,3,7]", "pipeline.stages=3"],
        "gives stage 1 no layers (or is unsorted)",
    ),
    "fewer ranks than stages": (
        ["pipeline.stages=2"],
        "pipeline.stages=2 needs at least 2 ranks but this launch has 1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_nothing_written(case: str, tmp_path: Path, no_weights_folder: Path):
    overrides, message = BAD_INPUTS[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [o.format(empty=empty, noweights=no_weights_folder) for o in overrides]
    out = tmp_path / "out"
    proc = _recipe([*overrides, f"output_dir={out}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipefit: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0]
    assert not out.exists()


def test_misspelt_key_fails_at_compose_time(tmp_path: Path):
    out = tmp_path / "out"
    proc = _recipe(["train.max_stepz=3", f"output_dir={out}"])
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr
    assert not out.exists()


def test_cfg_job_prints_resolved_config():
    proc = _recipe(["--cfg", "job", "pipeline.stages=3", "optim.lr=0.0005"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stages: 3" in proc.stdout
    assert "lr: 0.0005" in proc.stdout
    assert "model_type: llama" in proc.stdout


@pytest.mark.parametrize(
    "model,stages",
    [
        ("llama_tiny", 3),
        ("gpt2_tiny", 4),
        ("qwen2_tiny", 2),
        ("mistral_tiny", 5),
        ("qwen3_tiny", 3),
        ("gemma_tiny", 2),
        ("gemma2_tiny", 3),
        ("phi3_tiny", 2),
        ("gpt_neox_tiny", 3),
        ("opt_tiny", 4),
        ("bert_tiny", 3),
        ("bert_cls_tiny", 2),
    ],
)
def test_verify_passes_for_every_preset(model: str, stages: int, capsys: pytest.CaptureFixture[str]):
    assert cli_main(["verify", f"model={model}", f"pipeline.stages={stages}"]) == 0
    out = capsys.readouterr().out
    assert out.count("stage boundary") == stages - 1
    assert "PASS" in out


def test_verify_reads_a_local_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder, _ = saved_model(tmp_path, "gpt2")
    assert (
        cli_main(["verify", "model=local", f"model.path={folder}", "pipeline.stages=3", "pipeline.partition=uniform"])
        == 0
    )
    assert "boundaries: [0, 2, 4, 6]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("family", "attention", "boundaries"), [("llama_tied", "sdpa", [0, 3, 6]), ("gemma2", "eager", [0, 4, 7])]
)
def test_a_folder_alone_verifies_and_plans_as_that_model(
    family: str, attention: str, boundaries: list[int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # No model=local and no attention override: the folder's own config (tied head, 64 wide), and
    # the attention from_pretrained would pick (Gemma-2 has no sdpa).
    folder, _ = saved_model(tmp_path, family)
    assert cli_main(["verify", f"model.path={folder}", "pipeline.stages=2", "pipeline.partition=uniform"]) == 0
    out = capsys.readouterr().out
    assert f"boundaries: {boundaries}" in out and out.endswith("PASS: tolerance 1.0e-05\n")
    assert cli_main(["plan", f"model.path={folder}", "pipeline.stages=2", "pipeline.partition=flops", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["model"], report["attention"]) == (f"{family}-seed0", attention)


def test_a_preset_that_contradicts_the_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder, _ = saved_model(tmp_path, "gpt2")
    capsys.readouterr()
    assert cli_main(["verify", "model=llama_tiny", f"model.path={folder}"]) == 2
    assert capsys.readouterr().err == (
        f"pipefit: error: model=llama_tiny and model.path='{folder}' describe different models: "
        "hf_config.model_type is 'llama' in the preset but 'gpt2' in the folder's config.json; accepted: "
        f"model.path={folder} alone (the folder's own model), or a preset that matches it\n"
    )


def test_verify_fails_when_a_stage_is_wrong(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    original = pipefit.model.layers.NormLayer.forward

    def perturbed(self, inputs):  # a bug in one layer: the final norm off by 1e-3
        return original(self, inputs) + 1e-3

    monkeypatch.setattr(pipefit.model.layers.NormLayer, "forward", perturbed)
    assert cli_main(["verify", "model=llama_tiny", "pipeline.stages=2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out


def test_verify_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]):
    assert cli_main(["verify", "model=local", "model.path=/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipefit: error: model.path='/nonexistent' is not a folder")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_verify_runs_in_the_training_precision(precision: str):
    """Both models are cast alike: the same bits at the boundary and in the logits, a loss unlike fp32's."""
    from launching import compose
    from pipefit.config import validate
    from pipefit.parity.verify import verify

    split = ["pipeline.stages=2", "pipeline.partition=parameters"]
    fp32 = verify(validate(compose(split)))
    low = verify(validate(compose([*split, f"train.precision={precision}"])))
    assert (low.boundary_diffs, low.logits_diff, low.loss_pipeline) == ([(1, 3, 0.0)], 0.0, low.loss_hf)
    assert 1e-6 < abs(low.loss_pipeline - fp32.loss_pipeline) < 1e-2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "--device='tpu' is not accepted; expected cpu, cuda or cuda:N"),
        (["--device", "cuda:0"], "--device=cuda:0 is not available: this machine has 0 CUDA device(s)"),
        (
            ["model=bert_tiny", "train.precision=bf16"],
            "pipefit verify of an encoder runs on cpu in fp32 only (got --device=cpu, train.precision=bf16)",
        ),
    ],
)
def test_verify_device_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    assert cli_main(["verify", *args]) == 2
    assert capsys.readouterr().err.strip() == f"pipefit: error: {message}"


def test_gpu_check_script_without_cuda_is_one_line_and_exit_0():
    """benchmarks/gpu_check.py on a machine without CUDA: says so and checks nothing (the suite does)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (0, "gpu_check: no CUDA device; nothing checked\n")


def test_verify_detects_a_one_ulp_free_mismatch_in_boundaries():
    """The report's boundary diffs are measured, not assumed: a perturbed block shows at its boundary."""
    from launching import compose
    from pipefit.config import validate
    from pipefit.parity.verify import verify

    run = validate(compose(["model=llama_tiny", "pipeline.stages=3", "pipeline.partition=uniform"]))
    clean = verify(run)
    assert clean.worst <= 1e-5
    original = pipefit.model.layers.BlockLayer.forward

    def shifted(self, inputs):
        hidden, pos = original(self, inputs)
        return hidden + 1e-2, pos

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipefit.model.layers.BlockLayer, "forward", shifted)
        bad = verify(run)
    assert all(d > 1e-3 for _, _, d in bad.boundary_diffs)
    assert bad.logits_diff > 1e-3
    assert torch.isfinite(torch.tensor(bad.worst))


def test_verify_of_a_damaged_folder_is_bad_input_not_a_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A truncated shard or an unreadable config.json: exit 2 and one line naming the folder (1 means FAIL)."""
    folder, _ = saved_model(tmp_path, "llama")
    capsys.readouterr()  # the save's progress bar
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:4000])
    assert cli_main(["verify", "model=local", f"model.path={folder}", "pipeline.stages=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pipefit: error: model.path={str(folder)!r} "), err
    (folder / "config.json").write_text("{not json")
    assert cli_main(["verify", "model=local", f"model.path={folder}", "pipeline.stages=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pipefit: error: model.path={str(folder)!r} "), err


def test_plan_png_says_where_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plan", "pipeline.stages=2", "--png", "plan.png"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"wrote the plan picture to {tmp_path.resolve() / 'plan.png'}"
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def _fake_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder whose checkpoint ``pipefit export`` accepts as a source (it is refused before any read)."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "pipefit_state.json").write_text('{"format": 1, "step": 4}')
    for i in range(5):
        (ckpt / f"layer_{i:02d}-model_states.pt").write_bytes(bytes([i]) * 100)
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (run / "metrics.jsonl").write_text('{"step": 4, "loss": 6.0}\n')
    (run / "train.log").write_text("step 4/4 loss 6.0\n")
    return run, ckpt


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_replaces_its_source_or_a_folder_that_is_not_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run, ckpt = _fake_run(tmp_path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    before = {p: _files(p) for p in (run, other)}
    assert len(before[run]) == 9
    tail = "which this export reads; nothing was written; give a destination outside it"
    cases = [
        ([str(ckpt), str(ckpt)], f"out_dir={str(ckpt)!r} is checkpoint={str(ckpt)!r}, {tail}"),
        ([str(ckpt), str(run)], f"out_dir={str(run)!r} holds checkpoint={str(ckpt)!r}, {tail}"),
        ([str(run), str(run)], f"out_dir={str(run)!r} is checkpoint={str(run)!r}, {tail}"),
        ([str(run), str(tmp_path)], f"out_dir={str(tmp_path)!r} holds checkpoint={str(run)!r}, {tail}"),
        (
            [str(ckpt), str(other)],
            f"out_dir={str(other)!r} is not empty (1 entry) and is not a previous pipefit export "
            "(no pipefit_export.json); nothing was written; give a new or empty folder, or move its contents away",
        ),
    ]
    for args, message in cases:
        assert cli_main(["export", *args]) == 2, args
        assert capsys.readouterr().err.splitlines() == [f"pipefit: error: {message}"]
    assert {p: _files(p) for p in (run, other)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "run"]  # no staging folder left either
