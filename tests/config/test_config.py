"""The Hydra config tree (conf/) composed against pipefit's schema, and pipefit.config validation."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

# Importing pipefit.config registers the schema "pipefit_schema" that conf/config.yaml lists first.
from pipefit.config import ConfigError, RunConfig, check_world, validate
from pipefit.config.compose import leaves
from pipefit.model.hf import load_hf_config
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition.boundaries import boundaries_for

CONF = Path(__file__).resolve().parents[2] / "conf"

# Files whose required fields are ``???``: the overrides a user must add, and what validate() then says.
REQUIRED_OVERRIDES: dict[str, list[str]] = {
    "model/local.yaml": ["model.path=/models/some-llama"],
    "data/text.yaml": ["data.data_files=[/data/a.txt,/data/b.txt]"],
    "data/json.yaml": ["data.data_files=[/data/train.jsonl]"],
    "data/hub.yaml": ["data.path=/data/saved_dataset"],
    "data/chat.yaml": ["data.data_files=[/data/chats.jsonl]"],
    "data/instruction.yaml": ["data.data_files=[/data/sft.jsonl]"],
}


def compose_cfg(overrides: list[str] | None = None, conf_dir: Path = CONF) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def compose_run(*overrides: str) -> RunConfig:
    return validate(compose_cfg(list(overrides)))


def _primary_groups() -> set[str]:
    defaults = OmegaConf.load(CONF / "config.yaml").defaults
    groups = set()
    for entry in defaults:
        if isinstance(entry, DictConfig):
            groups.update(k for k in entry if not str(k).startswith("override "))
    return groups


def _expected_values(rel: str) -> dict[str, Any]:
    """Leaf values a group file sets, at the place the composed config holds them."""
    path = CONF / rel
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    if "# @package _global_" in path.read_text():
        package = ""
    else:
        package = rel.rsplit("/", 1)[0].replace("/", ".")
    values = leaves(raw, package)
    return {k: v for k, v in values.items() if v != "???" and not (isinstance(v, str) and "${" in v)}


# --- every file under conf/ ---------------------------------------------------------------------


def test_every_conf_file_composes_and_validates() -> None:
    files = sorted(p.relative_to(CONF).as_posix() for p in CONF.glob("**/*.yaml"))
    assert "config.yaml" in files and len(files) >= 16, files
    groups = _primary_groups()
    assert {"model", "data", "pipeline", "zero", "optim", "train"} <= groups
    composed: list[str] = []
    for rel in files:
        if rel == "config.yaml":
            overrides: list[str] = []
        else:
            group, name = rel[: -len(".yaml")].rsplit("/", 1)
            prefix = "" if group in groups else "+"
            overrides = [f"{prefix}{group}={name}"]
        if "???" in (CONF / rel).read_text():
            assert rel in REQUIRED_OVERRIDES, f"{rel} has required (???) fields: add the overrides a user gives"
        overrides += REQUIRED_OVERRIDES.get(rel, [])
        cfg = compose_cfg(overrides)
        run = validate(cfg)
        assert isinstance(run, RunConfig)
        assert run.output_dir == f"outputs/{run.model.name}"  # interpolations resolve
        if rel != "config.yaml":
            # The file's own values are the ones in effect (the override chose this very file).
            expected = _expected_values(rel)
            assert expected, rel
            for key, value in expected.items():
                assert OmegaConf.select(cfg, key) == value, (rel, key)
        composed.append(rel)
    assert composed == files


def test_required_field_files_with_their_overrides() -> None:
    run = compose_run("model=local", "model.path=/models/some-llama")
    assert run.model.name == "local"
    assert run.model.path == "/models/some-llama"
    assert run.model.hf_config == {}

    run = compose_run("data=text", "data.data_files=[/data/a.txt,/data/b.txt]")
    assert (run.data.source, run.data.data_files) == ("text", ["/data/a.txt", "/data/b.txt"])

    run = compose_run("data=json", "data.data_files=[/data/train.jsonl]", "data.text_field=content")
    assert (run.data.source, run.data.data_files, run.data.text_field) == ("json", ["/data/train.jsonl"], "content")


def test_a_model_folder_alone_drops_the_default_preset() -> None:
    from pipefit.config.compose import compose as pipefit_compose

    run = validate(pipefit_compose(["model.path=/models/My-Llama/", "++model.hf_config.num_hidden_layers=2"]))
    assert (run.model.name, run.model.path, run.model.hf_config) == (
        "My-Llama",
        "/models/My-Llama/",
        {"num_hidden_layers": 2},
    )
    assert (run.model.attn_implementation, run.output_dir) == (None, "outputs/My-Llama")
    # A preset named on the command line stays (its hf_config then has to agree with the folder's config.json).
    run = validate(pipefit_compose(["model=gemma2_tiny", "model.path=/models/g2"]))
    assert (run.model.name, run.model.hf_config["sliding_window"]) == ("gemma2_tiny", 16)


def test_prepare_reads_a_model_folder_alone_as_that_folder(tmp_path: Path) -> None:
    from conftest import saved_model
    from pipefit.run.preflight import prepare

    folder, _ = saved_model(tmp_path, "gpt2")
    overrides = [f"model.path={folder}", f"output_dir={tmp_path / 'out'}"]
    # The recipe's cfg, as Hydra composed it, and the overrides as typed.
    prepared = prepare(compose_cfg(overrides), overrides, env={"WORLD_SIZE": "2"})
    assert (prepared.run.model.name, prepared.run.model.hf_config) == ("gpt2-seed0", {})
    assert (type(prepared.hf_config).__name__, prepared.hf_config.tie_word_embeddings) == ("GPT2Config", True)
    assert prepared.hf_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("data", ["text", "json"])
def test_local_data_without_files_is_an_error(data: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.data_files is empty for data\.source={data}"):
        compose_run(f"data={data}")


def test_local_model_without_path_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.path"):
        compose_run("model=local")


def test_defaults_compose_to_the_documented_run() -> None:
    run = compose_run()
    assert run.model.name == "llama_tiny"
    assert run.model.hf_config["num_hidden_layers"] == 4
    assert (run.pipeline.stages, run.pipeline.partition, run.pipeline.boundaries) == (2, "flops", None)
    assert run.zero.stage == 1
    assert (run.train.micro_batch_size, run.train.grad_accum_steps, run.train.precision) == (4, 4, "fp32")
    assert run.output_dir == "outputs/llama_tiny"


@pytest.mark.parametrize(
    ("device_name", "preset", "memory_gib", "peak_bf16"),
    [
        (None, "cpu", 8.0, 0.1),
        ("NVIDIA A100-SXM4-80GB", "a100", 80.0, 312.0),
        ("NVIDIA H100 80GB HBM3", "h100", 80.0, 989.0),
        ("NVIDIA H200", "h200", 140.0, 989.0),
    ],
)
def test_default_hardware_is_the_detected_device(
    monkeypatch: pytest.MonkeyPatch, device_name: str | None, preset: str, memory_gib: float, peak_bf16: float
) -> None:
    """hardware=auto (the default) prices the machine it runs on, not always the CPU preset."""
    from pipefit.config import hardware as config

    monkeypatch.setattr(config, "detect_device_name", lambda: device_name)
    assert compose_cfg().hardware.name == "auto"
    hw = compose_run().hardware
    assert (hw.name, hw.memory_gib, hw.peak_tflops_bf16) == (preset, memory_gib, peak_bf16)
    # A field set besides the preset is kept; an explicit preset is never replaced.
    assert compose_run("hardware.memory_gib=40").hardware.memory_gib == 40.0
    assert compose_run("hardware=a100").hardware.name == "a100"


def test_default_hardware_on_a_cuda_device_without_preset(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU without a preset still trains: a100's compute figures, the device's own memory, one warning."""
    from pipefit.config import hardware as config

    monkeypatch.setattr(config, "detect_device_name", lambda: "NVIDIA L40S")
    monkeypatch.setattr(config, "detect_device_memory_gib", lambda: 44.52)
    monkeypatch.setattr(config, "_WARNED_DEVICES", set())
    with caplog.at_level("WARNING", logger="pipefit"):
        hw = compose_run().hardware
        compose_run()
    assert (hw.name, hw.memory_gib, hw.peak_tflops_bf16, hw.peak_tflops_fp32) == ("cuda", 44.52, 312.0, 19.5)
    warned = [r.getMessage() for r in caplog.records if "has no preset" in r.getMessage()]
    assert warned == [
        "hardware=auto: CUDA device 'NVIDIA L40S' has no preset (device names with H200, H100, A100 do); priced "
        "with a100's compute figures and the device's 44.5 GiB; set hardware.peak_tflops_bf16, "
        "hardware.peak_tflops_fp32 and hardware.link_bandwidth_gbs for exact prices"
    ]
    assert compose_run("hardware.peak_tflops_bf16=181").hardware.peak_tflops_bf16 == 181.0
    assert compose_run("hardware=h100").hardware.name == "h100"


def test_experiment_overrides_model_and_pipeline() -> None:
    run = compose_run("+experiment=gpt2_tiny_pp2")
    assert run.model.name == "gpt2_tiny"
    assert run.model.hf_config["model_type"] == "gpt2"
    assert (run.pipeline.stages, run.pipeline.partition) == (2, "uniform")
    assert run.train.max_steps == 30
    assert run.output_dir == "outputs/gpt2_tiny"


def test_each_experiment_opens_with_its_launch_command() -> None:
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path
        assert lines[1].startswith("# accelerate launch "), path
        assert f"+experiment={path.stem}" in lines[1], path


def test_manual_pipeline_boundaries_fit_the_default_model() -> None:
    # conf/pipeline/manual.yaml says its [0, 4, 7] suits llama_tiny's 7 layers.
    run = compose_run("pipeline=manual")
    assert run.pipeline.boundaries == [0, 4, 7]
    skeleton = make_skeleton(load_hf_config(run.model.path, run.model.hf_config))
    assert len(layer_plan(skeleton)) == 7
    assert boundaries_for(skeleton, run.pipeline.partition, run.pipeline.stages, run.pipeline.boundaries) == [0, 4, 7]


# --- the schema catches typos at compose time ---------------------------------------------------


def test_misspelt_override_fails_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException, match=r"max_stepz"):
        compose_cfg(["train.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match=r"partitoin"):
        compose_cfg(["pipeline.partitoin=uniform"])


def test_wrongly_typed_override_fails_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException, match=r"max_steps"):
        compose_cfg(["train.max_steps=forty"])


def test_misspelt_key_in_a_yaml_file_fails_at_compose_time(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "train" / "typo.yaml").write_text("max_steps: 3\nmicro_batch_sise: 2\n")
    with pytest.raises(ConfigCompositionException, match=r"micro_batch_sise"):
        compose_cfg(["train=typo"], conf_dir=conf)
    # The same folder composes fine without the typo (the failure above is the key, not the copy).
    (conf / "train" / "typo.yaml").write_text("max_steps: 3\nmicro_batch_size: 2\n")
    assert compose_cfg(["train=typo"], conf_dir=conf).train.micro_batch_size == 2


# --- validate(): values that depend on each other -----------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused_with_pipeline_stages(stage: int) -> None:
    with pytest.raises(ConfigError, match=rf"zero\.stage={stage} cannot be combined with pipeline\.stages=2"):
        compose_run(f"zero.stage={stage}", "pipeline.stages=2")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused_with_one_stage_too(stage: int) -> None:
    # pipefit always trains through DeepSpeed's PipelineEngine, which asserts ZeRO < 2 at any stage count.
    with pytest.raises(ConfigError, match=rf"zero\.stage={stage} cannot be combined with pipeline\.stages=1"):
        compose_run(f"zero.stage={stage}", "pipeline.stages=1")


@pytest.mark.parametrize("stage", [0, 1])
def test_zero_0_and_1_without_pipeline(stage: int) -> None:
    run = compose_run(f"zero.stage={stage}", "pipeline.stages=1")
    assert (run.zero.stage, run.pipeline.stages) == (stage, 1)


def test_zero_0_and_1_with_pipeline() -> None:
    assert compose_run("zero=zero0").zero.stage == 0
    assert compose_run("zero=zero1", "pipeline.stages=4").zero.stage == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.attn_implementation=flash_attention_2"],
            "model.attn_implementation=flash_attention_2 is not accepted with train.precision=fp32: flash-attn runs "
            "in bf16/fp16 only; use train.precision=bf16 or model.attn_implementation=sdpa",
        ),
        (
            ["model.attn_implementation=flash_attention_2", "train.precision=bf16", "data.layout=pack"],
            "model.attn_implementation=flash_attention_2 with data.layout=pack needs train.micro_batch_size=1 (got 4): "
            "HF's flash path separates packed documents in one-row micro-batches only; use train.micro_batch_size=1 "
            "or model.attn_implementation=sdpa",
        ),
    ],
)
def test_flash_attention_combinations_that_fail_or_mix_documents(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_run(*overrides)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.precision=bf16"],
        ["train.precision=fp16", "data.layout=pad"],
        ["train.precision=bf16", "data.layout=pack", "train.micro_batch_size=1", "train.grad_accum_steps=16"],
    ],
)
def test_flash_attention_combinations_accepted(overrides: list[str]) -> None:
    assert compose_run("model.attn_implementation=flash_attention_2", *overrides).model.attn_implementation == (
        "flash_attention_2"
    )


@pytest.mark.parametrize("partition", ["uniform", "parameters", "manual", "type:BlockLayer", "Type:decoder"])
def test_partition_methods_accepted(partition: str) -> None:
    assert compose_run(f"pipeline.partition={partition}").pipeline.partition == partition


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["zero.stage=4"], r"zero\.stage=4 is not accepted; accepted: 0, 1, 2, 3"),
        (
            ["pipeline.partition=balanced"],
            r"pipeline\.partition='balanced' is not accepted; "
            r"accepted: uniform, parameters, flops, profile, type:REGEX, manual",
        ),
        (["pipeline.stages=0"], r"pipeline\.stages=0 is not accepted; expected a number > 0"),
        (["pipeline.activation_checkpoint_interval=-1"], r"activation_checkpoint_interval=-1 .*>= 0"),
        (["train.precision=fp8"], r"train\.precision='fp8' is not accepted; accepted: fp32, bf16, fp16"),
        (["train.micro_batch_size=0"], r"train\.micro_batch_size=0 is not accepted; expected a number > 0"),
        (["train.micro_batch_size=-2"], r"train\.micro_batch_size=-2 is not accepted"),
        (["train.grad_accum_steps=0"], r"train\.grad_accum_steps=0 is not accepted"),
        (["train.max_steps=0"], r"train\.max_steps=0 is not accepted"),
        (["train.log_every=0"], r"train\.log_every=0 is not accepted"),
        (["optim.lr=0"], r"optim\.lr=0\.0 is not accepted; expected a number > 0"),
        (["optim.weight_decay=-0.1"], r"optim\.weight_decay=-0\.1 is not accepted; expected a number >= 0"),
        (["optim.scheduler=step"], r"optim\.scheduler='step' is not accepted; accepted: cosine, linear, constant"),
        (["optim.impl=apex"], r"optim\.impl='apex' is not accepted; accepted: auto, torch, fused"),
        (["optim.name=sgd"], r"optim\.name='sgd' is not accepted; accepted: adamw"),
        (["optim.betas=[0.9,1.0]"], r"optim\.betas=\[0\.9, 1\.0\] is not accepted; expected two numbers in \[0, 1\)"),
        (["optim.betas=[0.9]"], r"optim\.betas=\[0\.9\] is not accepted"),
        (["optim.min_lr_ratio=1.5"], r"optim\.min_lr_ratio=1\.5 is not accepted; expected a number in \[0, 1\]"),
        (["data.seq_len=1"], r"data\.seq_len=1 is not accepted; expected an integer >= 2"),
        (["data.source=csv"], r"data\.source='csv' is not accepted; accepted: pydoc, text, json, hub"),
        (["data.source=hub"], r"data\.path is empty for data\.source=hub"),
    ],
)
def test_validate_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compose_run(*overrides)


def test_validate_accepts_edge_values() -> None:
    run = compose_run(
        "optim.weight_decay=0", "optim.grad_clip=0", "optim.warmup_steps=0", "optim.min_lr_ratio=1", "data.seq_len=2"
    )
    assert (run.optim.weight_decay, run.optim.grad_clip, run.optim.warmup_steps) == (0.0, 0.0, 0)
    assert (run.optim.min_lr_ratio, run.data.seq_len) == (1.0, 2)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- check_world: the launch matches the pipeline -----------------------------------------------


def test_check_world_data_parallel_degree() -> None:
    run = compose_run()
    assert check_world(run, 2) == 1
    assert check_world(run, 4) == 2
    assert check_world(run, 6) == 3
    assert check_world(compose_run("pipeline.stages=1"), 3) == 3


def test_check_world_too_few_ranks() -> None:
    run = compose_run("pipeline.stages=4")
    with pytest.raises(ConfigError, match=r"pipeline\.stages=4 needs at least 4 ranks but this launch has 3"):
        check_world(run, 3)


def test_check_world_not_divisible() -> None:
    run = compose_run("pipeline.stages=2")
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by pipeline\.stages=2"):
        check_world(run, 3)


def test_check_world_global_batch_mismatch() -> None:
    run = compose_run(
        "pipeline.stages=2", "train.micro_batch_size=3", "train.grad_accum_steps=5", "train.global_batch_size=20"
    )
    with pytest.raises(
        ConfigError,
        match=r"train\.global_batch_size=20 != train\.micro_batch_size \(3\) x train\.grad_accum_steps \(5\) x "
        r"data-parallel size \(2\) = 30",
    ):
        check_world(run, 4)


def test_check_world_global_batch_that_agrees() -> None:
    run = compose_run(
        "pipeline.stages=2", "train.micro_batch_size=3", "train.grad_accum_steps=5", "train.global_batch_size=30"
    )
    assert check_world(run, 4) == 2


def test_heartbeat_settings_are_validated() -> None:
    run = compose_run("train.heartbeat_timeout_s=0")
    assert run.train.heartbeat_timeout_s == 0  # 0 switches the watchdog off
    with pytest.raises(
        ConfigError, match=r"train\.heartbeat_timeout_s=3\.0 is not accepted; expected 0 \(off\) or at least"
    ):
        compose_run("train.heartbeat_timeout_s=3", "train.heartbeat_interval_s=2")
    with pytest.raises(ConfigError, match=r"train\.heartbeat_interval_s=0\.0 is not accepted"):
        compose_run("train.heartbeat_interval_s=0")


# --- output_dir: checked before any rank starts --------------------------------------------------


def _prepare(out: Path, *overrides: str, corpus: Path | None = None) -> Any:
    """``Prepared`` of the default model on a small JSON Lines corpus, writing into ``out`` (2 ranks)."""
    from launching import compose
    from pipefit.run.preflight import Prepared

    data = corpus or out.parent / "corpus.jsonl"
    if not data.exists():
        line = '{"text": "Pipelines split a model into stages; each stage runs on its own rank."}\n'
        data.write_text(line * 60)
    base = ["data=json", f"data.data_files=[{data}]", "data.seq_len=16", f"output_dir={out}"]
    return Prepared(validate(compose([*base, *overrides])), 2)


def _other_run(out: Path, *overrides: str) -> dict[str, bytes]:
    """A finished run of gpt2_tiny in ``out`` (config.yaml, metrics to step 4, checkpoints 2 and 4); its files."""
    from launching import compose

    run = validate(compose(["model=gpt2_tiny", f"output_dir={out}", *overrides]))
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {9 - s}.0}}\n' for s in range(1, 5)))
    (out / "train.log").write_text("step 4/4 loss 5.0\n")
    for step in (2, 4):
        ckpt = out / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "pipefit_state.json").write_text(f'{{"format": 1, "step": {step}}}')
        (ckpt / "layer_00-model_states.pt").write_bytes(bytes([step]) * 64)
    (out / "checkpoints" / "latest").write_text("step_00000004")
    return _files(out)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _another_run_in_it(out: Path) -> tuple[list[str], str]:
    _other_run(out)
    return [], (
        f"output_dir={str(out)!r} holds another run (model gpt2_tiny, trained to step 4) than this one "
        "(model llama_tiny, train.max_steps=80), differing in model.hf_config, model.name, data.data_files, "
        "data.name and 2 more; accepted: train.resume=auto to continue it, another output_dir, or "
        "train.overwrite_output_dir=true to replace it"
    )


def _overwrite_of_what_the_run_reads(out: Path) -> tuple[list[str], str]:
    from conftest import saved_model

    _other_run(out)
    folder, _ = saved_model(out / "models", "llama")
    return ["model=local", f"model.path={folder}", "train.overwrite_output_dir=true"], (
        f"train.overwrite_output_dir=true would delete model.path={str(folder)!r}, which this run reads, with the "
        f"old run in output_dir={str(out)!r}; accepted: another output_dir, or train.overwrite_output_dir=false"
    )


def _export_folder_holding_other_data(out: Path) -> tuple[list[str], str]:
    (out / "hf_model").mkdir(parents=True)
    (out / "hf_model" / "weights.bin").write_bytes(b"mine")
    return [], (
        f"the export folder output_dir/hf_model={str(out / 'hf_model')!r} is not empty (1 entry) and is not a "
        "previous pipefit export (no pipefit_export.json); nothing was written; give a new or empty folder, or "
        "move its contents away"
    )


@pytest.mark.parametrize(
    ("case", "files"),
    [(_another_run_in_it, 8), (_overwrite_of_what_the_run_reads, 11), (_export_folder_holding_other_data, 1)],
    ids=["another-run", "overwrite-deletes-model-path", "export-over-other-data"],
)
def test_output_folder_refusals_are_one_line_before_training_and_touch_nothing(
    tmp_path: Path, case: Any, files: int
) -> None:
    out = tmp_path / "run"
    overrides, expected = case(out)
    before = _files(out)
    with pytest.raises(ValueError) as info:  # ConfigError, or the export's ExportDestinationError
        _prepare(out, *overrides)
    assert str(info.value) == expected
    assert _files(out) == before and len(before) == files


def test_output_dir_of_a_run_without_checkpoints_does_not_offer_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _other_run(out)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ConfigError, match=r"differing in .*; accepted: another output_dir, or train\.overwrite"):
        _prepare(out, "train.resume=auto")  # auto finds no checkpoint: a fresh run, and not the same one


def test_rerun_of_the_same_run_is_accepted_and_overwrite_replaces_another(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _prepare(out)  # nothing there yet
    # The same run again, launched differently (launch-only fields): accepted, the folder untouched.
    from pipefit.model.weights import EXPORT_MARKER

    out.mkdir()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(first.run)))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n')
    before = _files(out)
    _prepare(out, "train.progress_bar=false", "train.stop_after_steps=1", "train.save_every=5")
    assert _files(out) == before
    # Another run, with train.overwrite_output_dir=true: its files go; what a run does not write stays.
    shutil.rmtree(out)
    _other_run(out)
    (out / "hf_model").mkdir()
    (out / "hf_model" / EXPORT_MARKER).write_text("{}")
    (out / "hf_model" / "model.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("keep")
    _prepare(out, "train.overwrite_output_dir=true")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_output_dir_that_is_a_file_or_not_writable_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import os

    afile = tmp_path / "run.txt"
    afile.write_text("a file")
    with pytest.raises(ConfigError) as info:
        _prepare(afile, corpus=tmp_path / "corpus.jsonl")
    assert str(info.value) == f"output_dir={str(afile)!r} is a file; expected a folder (a new one, or this run's own)"
    with pytest.raises(ConfigError) as info:
        _prepare(afile / "run", corpus=tmp_path / "corpus.jsonl")
    assert str(info.value) == (
        f"output_dir={str(afile / 'run')!r} cannot be created: {str(afile)!r} is a file; expected a folder"
    )
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access
    # root ignores permission bits: make os.access answer as the bits say
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not (Path(p) == locked and mode & 2))
    try:
        with pytest.raises(ConfigError) as info:
            _prepare(locked / "a" / "run", corpus=tmp_path / "corpus.jsonl")
    finally:
        locked.chmod(0o755)
    assert str(info.value) == (
        f"output_dir={str(locked / 'a' / 'run')!r} is not writable (no write permission on {str(locked)!r}); "
        "give a folder you can write to"
    )
    assert list(locked.iterdir()) == []


def test_run_folders_are_neither_linted_nor_committed(tmp_path: Path) -> None:
    """Run folders (outputs/, runs/, exported/) hold DeepSpeed's zero_to_fp32.py: ruff and git must skip them."""
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).is_file():
        pytest.skip("ruff is not installed")
    repo = CONF.parent
    shutil.copy(repo / "pyproject.toml", tmp_path / "pyproject.toml")
    unused = "import os\nimport sys\n"
    for folder in ("outputs/llama_tiny/checkpoints/step_00000004", "runs/a/checkpoints/step_00000002", "exported/b"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "zero_to_fp32.py").write_text(unused)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "zero_to_fp32.py").write_text(unused)
    lint = [ruff, "check", "--no-cache", "."]
    assert subprocess.run(lint, cwd=tmp_path, capture_output=True, text=True).returncode == 0
    (tmp_path / "elsewhere" / "mine.py").write_text(unused)  # the same lint errors in project code are found
    assert subprocess.run(lint, cwd=tmp_path, capture_output=True, text=True).returncode == 1
    git = shutil.which("git")
    if git is not None:
        paths = ["outputs/x/train.log", "runs/x/metrics.jsonl", "exported/x/config.json"]
        proc = subprocess.run([git, "check-ignore", "--no-index", *paths], cwd=repo, capture_output=True, text=True)
        assert proc.stdout.split() == paths, proc.stderr


def test_in_process_configs_never_point_at_the_repository_outputs() -> None:
    """The README's first command leaves a run in outputs/llama_tiny; in-process tests must not meet it there."""
    from launching import REPO
    from launching import compose as launching_compose

    out = Path(launching_compose([]).output_dir)
    assert out.is_absolute() and REPO not in out.parents and not out.exists()
    assert launching_compose(["output_dir=/tmp/x"]).output_dir == "/tmp/x"


# --- pipeline.schedule ---------------------------------------------------------------------------


def test_pipeline_schedule_defaults_to_1f1b_and_accepts_zb1p() -> None:
    assert compose_run().pipeline.schedule == "1f1b"
    assert compose_run("pipeline.schedule=zb1p", "train.precision=bf16").pipeline.schedule == "zb1p"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["pipeline.schedule=gpipe"], r"pipeline\.schedule='gpipe' is not accepted; accepted: 1f1b, zb1p"),
        (
            ["pipeline.schedule=zb1p", "pipeline.stages=1"],
            r"pipeline\.schedule=zb1p cannot be combined with pipeline\.stages=1",
        ),
        (
            ["pipeline.schedule=zb1p", "train.precision=fp16"],
            r"pipeline\.schedule=zb1p cannot be combined with train\.precision=fp16",
        ),
    ],
)
def test_pipeline_schedule_refusals_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        compose_run(*overrides)
    assert "\n" not in str(err.value)
