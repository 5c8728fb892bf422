"""The DeepSpeed config derived from the pipefit config, accelerate's settings, and the LR schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipefit.config import ConfigError, OptimConfig, PipelineConfig, RunConfig, TrainConfig, ZeroConfig
from pipefit.run import ds_config
from pipefit.run.ds_config import (
    apply_accelerate_settings,
    build_ds_config,
    fused_adam_prebuilt,
    load_base_config,
    read_accelerate_env,
)
from pipefit.run.schedule import lr_factor, lr_schedule, scheduler_factory, transformers_lr_lambda


def make_run(**train: object) -> RunConfig:
    return RunConfig(train=TrainConfig(**train))  # type: ignore[arg-type]


# --- build_ds_config ----------------------------------------------------------------------------


def test_batch_sizes_zero_and_clipping() -> None:
    run = RunConfig(
        train=TrainConfig(micro_batch_size=3, grad_accum_steps=5, seed=77),
        zero=ZeroConfig(stage=0, reduce_bucket_size=123, allgather_bucket_size=456),
        optim=OptimConfig(grad_clip=0.25),
    )
    cfg = build_ds_config(run, dp=2, device_kind="cpu")
    assert cfg["train_batch_size"] == 30
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 5
    assert cfg["gradient_clipping"] == 0.25
    assert cfg["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 123, "allgather_bucket_size": 456}
    assert cfg["seed"] == 77
    # The schedule is a LambdaLR handed to deepspeed.initialize, never a DeepSpeed block.
    assert "scheduler" not in cfg
    assert build_ds_config(run, dp=4, device_kind="cpu")["train_batch_size"] == 60


def test_zero_stage_one() -> None:
    run = RunConfig(zero=ZeroConfig(stage=1))
    assert build_ds_config(run, dp=1, device_kind="cpu")["zero_optimization"]["stage"] == 1


def test_optimizer_block() -> None:
    run = RunConfig(optim=OptimConfig(lr=3e-4, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.05, impl="auto"))
    cfg = build_ds_config(run, dp=1, device_kind="cpu")
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {
            "lr": 3e-4,
            "betas": [0.8, 0.9],
            "eps": 1e-6,
            "weight_decay": 0.05,
            "torch_adam": True,
            "adam_w_mode": True,
        },
    }


@pytest.fixture
def prebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's fused_adam op counts as prebuilt."""
    monkeypatch.setattr(ds_config, "fused_adam_prebuilt", lambda: (True, "DeepSpeed's fused_adam op is prebuilt"))


@pytest.mark.parametrize(
    ("impl", "device_kind", "torch_adam"),
    [
        ("auto", "cpu", True),
        ("auto", "cuda", False),
        ("torch", "cuda", True),
        ("torch", "cpu", True),
        ("fused", "cuda", False),
        ("fused", "cpu", False),
    ],
)
def test_optimizer_impl(prebuilt: None, impl: str, device_kind: str, torch_adam: bool) -> None:
    run = RunConfig(optim=OptimConfig(impl=impl))
    params = build_ds_config(run, dp=1, device_kind=device_kind)["optimizer"]["params"]
    assert params["torch_adam"] is torch_adam
    assert "fused" not in params


class _Builder:
    def __init__(self, compatible: bool) -> None:
        self.compatible = compatible

    def is_compatible(self, verbose: bool = True) -> bool:
        return self.compatible


@pytest.mark.parametrize(
    ("installed", "compatible", "expected"),
    [
        (True, True, (True, "DeepSpeed's fused_adam op is prebuilt")),
        (
            False,
            True,
            (False, "DeepSpeed's fused_adam op is not prebuilt (DS_BUILD_FUSED_ADAM=1 at install prebuilds it)"),
        ),
        (True, False, (False, "DeepSpeed's fused_adam op is prebuilt but not compatible with this machine")),
    ],
)
def test_fused_adam_prebuilt(installed: bool, compatible: bool, expected: tuple[bool, str]) -> None:
    """Only a prebuilt, compatible op counts: a JIT compile at deepspeed.initialize may fail or time out."""
    assert fused_adam_prebuilt({"fused_adam": installed, "cpu_adam": True}, _Builder(compatible)) == expected


def test_auto_without_prebuilt_op_uses_torch_fused_adamw(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a GPU without DeepSpeed's prebuilt op, auto picks torch's fused AdamW and says so."""
    import deepspeed.git_version_info as info

    monkeypatch.setattr(info, "installed_ops", {**info.installed_ops, "fused_adam": False})
    run = RunConfig(optim=OptimConfig(impl="auto"))
    with caplog.at_level("INFO", logger="pipefit"):
        params = build_ds_config(run, dp=1, device_kind="cuda")["optimizer"]["params"]
    assert (params["torch_adam"], params["fused"]) == (True, True)
    assert caplog.messages == [
        "optim.impl=auto on cuda: torch.optim.AdamW(fused=True) (DeepSpeed's fused_adam op is not prebuilt "
        "(DS_BUILD_FUSED_ADAM=1 at install prebuilds it))"
    ]
    # DeepSpeed hands the extra key to torch.optim.AdamW as is.
    from deepspeed.runtime.engine import DeepSpeedEngine

    cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(None, dict(params), True)  # type: ignore[arg-type]
    assert (cls, kwargs) == (torch.optim.AdamW, {"foreach": None})
    # An explicit impl is never second-guessed.
    run.optim.impl = "fused"
    assert build_ds_config(run, dp=1, device_kind="cuda")["optimizer"]["params"]["torch_adam"] is False


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)],
)
def test_precision_flags(precision: str, bf16: bool, fp16: bool) -> None:
    cfg = build_ds_config(make_run(precision=precision), dp=1, device_kind="cpu")
    assert cfg["bf16"] == {"enabled": bf16}
    assert cfg["fp16"] == {"enabled": fp16}


@pytest.mark.parametrize(
    ("precision", "zero", "data_types"),
    [("bf16", 1, {"grad_accum_dtype": "fp32"}), ("bf16", 0, None), ("fp32", 1, None), ("fp16", 1, None)],
)
def test_bf16_with_zero1_accumulates_gradients_in_fp32(precision: str, zero: int, data_types: dict | None) -> None:
    # bf16 + ZeRO-1 + fp32 accumulation is DeepSpeed's BF16_Optimizer; under ZeRO-0 DeepSpeed refuses
    # a bf16 model with fp32 accumulation, so nothing is set there.
    run = RunConfig(train=TrainConfig(precision=precision), zero=ZeroConfig(stage=zero))
    assert build_ds_config(run, dp=1, device_kind="cpu").get("data_types") == data_types
    # A DeepSpeed config file's own choice stays.
    base = {"data_types": {"grad_accum_dtype": "bf16"}}
    cfg = build_ds_config(run, dp=1, device_kind="cpu", base=base)
    assert cfg["data_types"] == {"grad_accum_dtype": "bf16"}


@pytest.mark.parametrize("interval", [0, 1, 3])
def test_pipeline_block_asks_for_non_reentrant_activation_checkpointing(interval: int) -> None:
    run = RunConfig(pipeline=PipelineConfig(activation_checkpoint_interval=interval))
    cfg = build_ds_config(run, dp=1, device_kind="cpu")
    assert cfg["pipeline"] == {"activation_checkpoint_interval": interval, "use_reentrant": False}
    # A DeepSpeed config file's other pipeline keys stay; the derived ones win.
    base = {"pipeline": {"use_reentrant": True, "activation_checkpoint_interval": 7, "pipe_partitioned": False}}
    cfg = build_ds_config(run, dp=1, device_kind="cpu", base=base)
    assert cfg["pipeline"] == {
        "activation_checkpoint_interval": interval,
        "use_reentrant": False,
        "pipe_partitioned": False,
    }


def test_base_config_extra_keys_pass_through() -> None:
    base = {
        "activation_checkpointing": {"partition_activations": True},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "train_batch_size": 999,
        "comms_logger": {"enabled": True},
    }
    run = RunConfig(train=TrainConfig(micro_batch_size=2, grad_accum_steps=2), zero=ZeroConfig(stage=1))
    cfg = build_ds_config(run, dp=2, device_kind="cpu", base=base)
    assert cfg["activation_checkpointing"] == {"partition_activations": True}
    assert cfg["comms_logger"] == {"enabled": True}
    # Derived keys win; the base's other ZeRO settings stay.
    assert cfg["train_batch_size"] == 8
    assert cfg["zero_optimization"]["stage"] == 1
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    # The caller's dict is not modified.
    assert base["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert base["train_batch_size"] == 999


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("optimizer", r"sets 'optimizer'; pipefit derives it from the Hydra config: .* set optim\.\*"),
        ("scheduler", r"sets 'scheduler'; .* set optim\.scheduler/optim\.warmup_steps"),
    ],
)
def test_base_config_with_optimizer_or_scheduler_is_refused(key: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_ds_config(RunConfig(), dp=1, device_kind="cpu", base={key: {"type": "AdamW"}, "seed": 1})


# --- accelerate's settings ----------------------------------------------------------------------

# What the script sees, captured from accelerate 1.15 (`accelerate launch ... /script printing os.environ`):
# `--config_file launch/cpu_2proc.yaml` (no DeepSpeed flags) ...
CPU_2PROC_ENV = {
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_multinode_launcher,mixed_precision",
    "ACCELERATE_USE_DEEPSPEED": "true",
}
# ... and `--use_deepspeed --zero_stage 0 --gradient_accumulation_steps 8` without a config file: the
# flags are exported, yet ACCELERATE_CONFIG_DS_FIELDS (keys of an accelerate config file) is empty.
FLAGS_ENV = {
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_CONFIG_DS_FIELDS": "",
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "8",
}


def accelerate_env(**extra: str) -> dict[str, str]:
    env = dict(FLAGS_ENV, ACCELERATE_CONFIG_DS_FIELDS="zero_stage,gradient_accumulation_steps")
    env.update(extra)
    return env


def taken(env: dict[str, str]) -> dict[str, object]:
    return {k: v for k, (v, _) in read_accelerate_env(env).values.items()}


def test_accelerate_settings_are_honoured() -> None:
    settings = read_accelerate_env(accelerate_env())
    assert settings.config_file is None
    assert {k: v for k, (v, _) in settings.values.items()} == {"zero.stage": 0, "train.grad_accum_steps": 8}
    run = apply_accelerate_settings(RunConfig(), settings, explicit=set())
    assert run.zero.stage == 0
    assert run.train.grad_accum_steps == 8
    # What accelerate did not set keeps the Hydra value.
    assert run.train.precision == "fp32"
    assert run.optim.grad_clip == 1.0


def test_a_launcher_number_replaces_an_auto_layout_field() -> None:
    from pipefit.run.ds_config import AccelerateSettings

    settings = AccelerateSettings({"train.micro_batch_size": (4, "ds.json:train_micro_batch_size_per_gpu=4")}, None)
    run = apply_accelerate_settings(make_run(micro_batch_size="auto"), settings, explicit=set())
    assert run.train.micro_batch_size == 4 and isinstance(run.train.micro_batch_size, int)


def test_command_line_flags_without_an_accelerate_config_file_are_honoured() -> None:
    assert taken(FLAGS_ENV) == {"zero.stage": 0, "train.grad_accum_steps": 8}
    run = apply_accelerate_settings(RunConfig(), read_accelerate_env(FLAGS_ENV), explicit=set())
    assert (run.zero.stage, run.train.grad_accum_steps) == (0, 8)


def test_accelerate_value_conflicting_with_a_hydra_override_is_an_error() -> None:
    settings = read_accelerate_env(accelerate_env())
    run = RunConfig(zero=ZeroConfig(stage=1))
    with pytest.raises(ConfigError, match=r"zero\.stage=1 \(Hydra override\) conflicts with accelerate --zero_stage 0"):
        apply_accelerate_settings(run, settings, explicit={"zero.stage"})


def test_accelerate_value_agreeing_with_a_hydra_override_is_fine() -> None:
    settings = read_accelerate_env(accelerate_env())
    run = apply_accelerate_settings(RunConfig(zero=ZeroConfig(stage=0)), settings, explicit={"zero.stage"})
    assert (run.zero.stage, run.train.grad_accum_steps) == (0, 8)


def test_hydra_default_gives_way_when_not_explicit() -> None:
    # The same conflicting value is no error when zero.stage came from a YAML file, not the command line.
    settings = read_accelerate_env(accelerate_env())
    run = apply_accelerate_settings(RunConfig(zero=ZeroConfig(stage=1)), settings, explicit={"train.max_steps"})
    assert run.zero.stage == 0


def test_accelerate_default_mixed_precision_is_not_a_setting() -> None:
    # accelerate always exports ACCELERATE_MIXED_PRECISION, "no" when nobody chose one (and the
    # shipped launch/cpu_2proc.yaml writes 'no'): Hydra's train.precision stays in charge.
    assert taken(CPU_2PROC_ENV) == {}
    run = apply_accelerate_settings(make_run(precision="bf16"), read_accelerate_env(CPU_2PROC_ENV), explicit=set())
    assert run.train.precision == "bf16"
    run = apply_accelerate_settings(
        make_run(precision="bf16"), read_accelerate_env(CPU_2PROC_ENV), explicit={"train.precision"}
    )
    assert run.train.precision == "bf16"


def test_without_deepspeed_nothing_is_taken() -> None:
    env = accelerate_env()
    del env["ACCELERATE_USE_DEEPSPEED"]
    settings = read_accelerate_env(env)
    assert settings.values == {} and settings.config_file is None
    assert taken(accelerate_env(ACCELERATE_USE_DEEPSPEED="false")) == {}
    assert taken(accelerate_env(ACCELERATE_USE_DEEPSPEED="TRUE")) == {"zero.stage": 0, "train.grad_accum_steps": 8}
    run = apply_accelerate_settings(RunConfig(), settings, explicit=set())
    assert (run.zero.stage, run.train.grad_accum_steps) == (1, 4)


@pytest.mark.parametrize(("accelerate", "precision"), [("bf16", "bf16"), ("fp16", "fp16")])
def test_mixed_precision_maps_to_train_precision(accelerate: str, precision: str) -> None:
    env = dict(CPU_2PROC_ENV, ACCELERATE_MIXED_PRECISION=accelerate)
    assert taken(env) == {"train.precision": precision}
    assert apply_accelerate_settings(make_run(precision="fp32"), read_accelerate_env(env), set()).train.precision == (
        precision
    )
    with pytest.raises(ConfigError, match=rf"train\.precision=fp32 \(Hydra override\) conflicts with .*{accelerate}"):
        apply_accelerate_settings(make_run(precision="fp32"), read_accelerate_env(env), {"train.precision"})


def test_gradient_clipping_from_accelerate() -> None:
    run = apply_accelerate_settings(
        RunConfig(), read_accelerate_env(dict(CPU_2PROC_ENV, ACCELERATE_GRADIENT_CLIPPING="0.5")), explicit=set()
    )
    assert run.optim.grad_clip == 0.5


@pytest.mark.parametrize("value", ["auto", "none", ""])
def test_unset_markers_are_not_values(value: str) -> None:
    assert taken(dict(CPU_2PROC_ENV, ACCELERATE_GRADIENT_ACCUMULATION_STEPS=value)) == {}


def test_unparsable_accelerate_value_is_an_error() -> None:
    env = dict(CPU_2PROC_ENV, ACCELERATE_DEEPSPEED_ZERO_STAGE="two")
    with pytest.raises(ConfigError, match=r"accelerate --zero_stage='two' is not a valid value for zero\.stage"):
        read_accelerate_env(env)


# --- --deepspeed_config_file --------------------------------------------------------------------


def test_deepspeed_config_file_values(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 8,
                "gradient_accumulation_steps": "auto",
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 0, "overlap_comm": True},
            }
        )
    )
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    settings = read_accelerate_env(env)
    assert settings.config_file == str(path)
    assert {k: v for k, (v, _) in settings.values.items()} == {
        "train.micro_batch_size": 8,
        "zero.stage": 0,
        "train.precision": "bf16",
    }
    run = apply_accelerate_settings(RunConfig(), settings, explicit=set())
    assert run.train.micro_batch_size == 8
    assert run.train.grad_accum_steps == 4  # "auto" leaves the Hydra value alone
    assert (run.zero.stage, run.train.precision) == (0, "bf16")
    # The file's other keys reach the DeepSpeed config.
    base = load_base_config(settings)
    cfg = build_ds_config(run, dp=2, device_kind="cpu", base=base)
    assert cfg["zero_optimization"] == {
        "stage": 0,
        "overlap_comm": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    assert cfg["train_batch_size"] == 8 * 4 * 2


def test_deepspeed_config_file_conflict_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    settings = read_accelerate_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})
    run = make_run(micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size=2 \(Hydra override\) conflicts with .*ds\.json"):
        apply_accelerate_settings(run, settings, explicit={"train.micro_batch_size"})


def test_missing_deepspeed_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(missing)}
    with pytest.raises(ConfigError, match=r"accelerate --deepspeed_config_file=.*nope\.json' does not exist"):
        read_accelerate_env(env)


def test_invalid_json_deepspeed_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 8,')
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    with pytest.raises(ConfigError, match=r"accelerate --deepspeed_config_file=.*bad\.json' is not valid JSON"):
        read_accelerate_env(env)


@pytest.mark.parametrize("value", ["none", "None", ""])
def test_no_deepspeed_config_file(value: str) -> None:
    settings = read_accelerate_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": value})
    assert settings.config_file is None
    assert load_base_config(settings) is None


# --- the learning-rate schedule -----------------------------------------------------------------


def test_warmup_factors() -> None:
    optim = OptimConfig(warmup_steps=4, scheduler="cosine", min_lr_ratio=0.1)
    assert [lr_factor(k, optim, 20) for k in range(4)] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]
    # Update 0 already learns (DeepSpeed's warmup schedulers give it 0).
    assert lr_factor(0, optim, 20) > 0
    # The first update after warmup runs at the full rate.
    assert lr_factor(4, optim, 20) == 1.0


def test_warmup_longer_than_the_run_is_capped() -> None:
    optim = OptimConfig(warmup_steps=50, scheduler="constant")
    assert [lr_factor(k, optim, 3) for k in range(3)] == [1 / 4, 2 / 4, 3 / 4]


def test_cosine_decay() -> None:
    optim = OptimConfig(warmup_steps=2, scheduler="cosine", min_lr_ratio=0.1)
    max_steps = 12  # decay spans updates 2..12 (10 updates)
    assert lr_factor(2, optim, max_steps) == 1.0
    # Halfway: floor + (1 - floor) / 2.
    assert lr_factor(7, optim, max_steps) == pytest.approx(0.55, abs=1e-12)
    assert lr_factor(4, optim, max_steps) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)), abs=1e-12)
    # The last optimizer update (0-based max_steps - 1) is one decay step short of the floor ...
    assert lr_factor(11, optim, max_steps) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)), abs=1e-12)
    # ... which the schedule reaches at max_steps and keeps after.
    assert lr_factor(12, optim, max_steps) == pytest.approx(0.1, abs=1e-12)
    assert lr_factor(30, optim, max_steps) == pytest.approx(0.1, abs=1e-12)
    factors = [lr_factor(k, optim, max_steps) for k in range(2, 13)]
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))


@pytest.mark.parametrize(
    ("optim", "max_steps", "expected"),
    [
        (OptimConfig(warmup_steps=0, scheduler="linear", min_lr_ratio=0.2), 4, [1.0, 0.8, 0.6, 0.4, 0.2, 0.2]),
        (OptimConfig(warmup_steps=1, scheduler="constant", min_lr_ratio=0.1), 5, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
    ids=["linear-decay", "constant-after-warmup"],
)
def test_lr_factors(optim: OptimConfig, max_steps: int, expected: list[float]) -> None:
    assert [lr_factor(k, optim, max_steps) for k in range(6)] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("optim", "max_steps", "expected"),
    [
        (OptimConfig(lr=0.1, warmup_steps=1, scheduler="linear", min_lr_ratio=0.0), 3, [0.05, 0.1, 0.05, 0.0]),
        (
            OptimConfig(lr=0.1, warmup_steps=1, scheduler="wsd", scheduler_kwargs={"num_decay_steps": 2}),
            4,
            [0.05, 0.1, 0.1, 0.05],
        ),
    ],
    ids=["pipefit-linear", "transformers-wsd"],
)
def test_scheduler_factory_drives_the_optimizer_lr(optim: OptimConfig, max_steps: int, expected: list[float]) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=optim.lr)
    scheduler = scheduler_factory(optim, max_steps=max_steps)(optimizer)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, abs=1e-12)


def test_transformers_schedules_by_name() -> None:
    def factors(name: str, warmup: int = 4, **kwargs: float) -> list[float]:
        optim = OptimConfig(scheduler=name, warmup_steps=warmup, scheduler_kwargs=kwargs)
        return [round(f, 4) for f in map(lr_schedule(optim, 12), range(12))]

    ramp = [0.2, 0.4, 0.6, 0.8]  # pipefit's warmup: update 0 already learns
    assert factors("constant_with_warmup") == [*ramp, *[1.0] * 8]
    assert factors("wsd", num_decay_steps=3) == [*ramp, *[1.0] * 6, 0.75, 0.25]
    assert factors("polynomial", power=2.0) == [*ramp, 1.0, 0.7656, 0.5625, 0.3906, 0.25, 0.1406, 0.0625, 0.0156]
    # cosine_with_min_lr is pipefit's cosine: the same factor at every update.
    pipefit_cosine = OptimConfig(scheduler="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert factors("cosine_with_min_lr", min_lr_rate=0.1) == [
        round(lr_factor(k, pipefit_cosine, 12), 4) for k in range(12)
    ]
    # A warmup that already learns at update 0 is transformers' own, untouched.
    assert factors("cosine_warmup_with_min_lr", min_lr_rate=0.1)[:4] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("name", ["cosine_with_restarts", "constant_with_warmup", "polynomial", "wsd", "inverse_sqrt"])
def test_only_the_warmup_departs_from_transformers(name: str) -> None:
    from transformers import get_scheduler

    kwargs = {"num_decay_steps": 3} if name == "wsd" else {}
    hf_name = {"wsd": "warmup_stable_decay"}.get(name, name)

    def theirs(warmup: int) -> list[float]:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        built = get_scheduler(hf_name, probe, warmup, 12, scheduler_specific_kwargs=kwargs)
        return [built.lr_lambdas[0](k) for k in range(13)]

    def ours(warmup: int) -> list[float]:
        factor = transformers_lr_lambda(
            OptimConfig(scheduler=hf_name, warmup_steps=warmup, scheduler_kwargs=kwargs), 12
        )
        wrapped = lr_schedule(OptimConfig(scheduler=hf_name, warmup_steps=warmup, scheduler_kwargs=kwargs), 12)
        assert [factor(k) for k in range(13)] == theirs(warmup)
        return [wrapped(k) for k in range(13)]

    # Where it matters: transformers' warmup gives update 0 a rate of 0 (no weight moves) ...
    assert theirs(4)[0] == 0.0 and ours(4)[0] == pytest.approx(0.2)
    assert ours(4)[4:] == theirs(4)[4:]  # ... and from the end of the warmup on, transformers' values.
    # Without a warmup update 0 learns in transformers too: nothing is changed.
    assert ours(0) == theirs(0) and theirs(0)[0] == 1.0


def test_scheduler_names_and_arguments_are_one_line_errors() -> None:
    from pipefit.config import validate

    with pytest.raises(ConfigError) as info:
        validate(RunConfig(optim=OptimConfig(scheduler="step")))
    assert str(info.value) == (
        "optim.scheduler='step' is not accepted; accepted: cosine, linear, constant, cosine_with_restarts, "
        "polynomial, constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, "
        "warmup_stable_decay, wsd"
    )
    with pytest.raises(ConfigError, match=r"^optim\.scheduler=reduce_lr_on_plateau is not accepted: it steps on an"):
        validate(RunConfig(optim=OptimConfig(scheduler="reduce_lr_on_plateau")))
    with pytest.raises(ConfigError) as info:
        validate(RunConfig(optim=OptimConfig(scheduler="cosine", scheduler_kwargs={"min_lr_rate": 0.1})))
    assert str(info.value) == (
        "optim.scheduler_kwargs={'min_lr_rate': 0.1} is not accepted with optim.scheduler=cosine (set "
        "optim.warmup_steps and optim.min_lr_ratio); accepted: {} here, or a transformers schedule such as "
        "cosine_with_min_lr"
    )
    with pytest.raises(ConfigError) as info:
        lr_schedule(OptimConfig(scheduler="cosine_with_min_lr"), 12)
    assert str(info.value) == (
        "optim.scheduler_kwargs={} is not accepted by optim.scheduler=cosine_with_min_lr (One of min_lr or "
        "min_lr_rate should be set through the `lr_scheduler_kwargs`); accepted: the keyword arguments of "
        "transformers' cosine_with_min_lr schedule"
    )


def test_a_schedule_missing_its_argument_fails_before_any_rank(tmp_path: Path) -> None:
    from pipefit.config.compose import compose
    from pipefit.run.preflight import prepare

    overrides = ["optim.scheduler=cosine_with_min_lr", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"^optim\.scheduler_kwargs=\{\} is not accepted by optim\.scheduler=cos"):
        prepare(compose(overrides), overrides, env={"WORLD_SIZE": "2"})
    overrides.append("+optim.scheduler_kwargs.min_lr_rate=0.1")
    assert prepare(compose(overrides), overrides, env={"WORLD_SIZE": "2"}).run.optim.scheduler_kwargs == {
        "min_lr_rate": 0.1
    }
    assert not (tmp_path / "out").exists()


def test_buckets_capped_at_dp1_where_nothing_is_reduced() -> None:
    """At dp=1 DeepSpeed still allocates a reduce_bucket_size bucket every pipeline step: pipefit caps it."""
    from pipefit.partition.memory import DP1_BUCKET_ELEMENTS

    run = RunConfig(zero=ZeroConfig(stage=1, reduce_bucket_size=50_000_000, allgather_bucket_size=500))
    zero = build_ds_config(run, dp=1, device_kind="cpu")["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (DP1_BUCKET_ELEMENTS, 500)
    zero = build_ds_config(run, dp=2, device_kind="cpu")["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (50_000_000, 500)
