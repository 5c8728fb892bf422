"""Precision: a checkpoint's dtype never decides the training dtypes; fp32 masters under bf16/fp16,
kept exactly and only where needed; fp16 resume; global-norm clipping under ZeRO-0.

The in-process tests use fakes of the few engine methods the functions read; the slow ones run real
ranks (2 processes, 2-3 steps each).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import build_loaded, random_tokens, run_layers, saved_model
from launching import compose, local_run, metrics, require_precision, run_recipe, tail
from pipefit.config import ConfigError, validate
from pipefit.model.hf import load_hf_config
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.model.weights import hf_state_dict
from pipefit.run import checkpoint
from pipefit.run import engine as run_engine
from pipefit.run import precision as run_precision


def _bf16_folder_and_upcast(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny Llama saved in bfloat16, and the same weights upcast exactly to float32 in another folder."""
    _, model = saved_model(tmp_path, "llama")
    model = model.to(torch.bfloat16)
    bf16 = tmp_path / "llama-bf16"
    model.save_pretrained(bf16)
    values = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = tmp_path / "llama-fp32-upcast"
    model.to(torch.float32).save_pretrained(fp32)
    return bf16, fp32, values


def test_bf16_checkpoint_builds_float32_stages_holding_its_exact_values(tmp_path: Path) -> None:
    bf16, fp32, values = _bf16_folder_and_upcast(tmp_path)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    outputs = []
    for folder in (bf16, fp32):
        hf_config = load_hf_config(str(folder), {})
        skeleton = make_skeleton(hf_config)
        n = len(layer_plan(skeleton))
        layers = build_loaded(skeleton, folder, 0, n)
        state = {k: v for layer in layers for k, v in hf_state_dict(layer).items()}
        assert {v.dtype for v in state.values()} == {torch.float32}
        for name, value in values.items():
            if name in state:  # the untied head's weight is lm_head.weight in both
                assert torch.equal(state[name], value.float()), name
        outputs.append(run_layers(layers, random_tokens()))
        # The export still writes the folder's own dtype.
        assert run_precision.export_dtype(hf_config) == (torch.bfloat16 if folder == bf16 else torch.float32)
    assert torch.equal(outputs[0], outputs[1])


def test_verify_on_a_bf16_checkpoint_compares_float32_with_float32(tmp_path: Path) -> None:
    from pipefit.parity.verify import verify

    bf16, _, _ = _bf16_folder_and_upcast(tmp_path)
    report = verify(validate(compose(["model=local", f"model.path={bf16}", "pipeline.stages=2"])))
    assert report.worst <= 1e-5  # a bf16 HF model against the fp32 pipeline: ~1e-2


def test_reference_trainer_refuses_a_half_precision_model() -> None:
    from pipefit.parity.reference import train_reference

    with pytest.raises(ValueError) as err:
        train_reference(nn.Linear(2, 2).to(torch.bfloat16), None, None, 1)  # type: ignore[arg-type]
    assert str(err.value) == (
        "the reference model holds bfloat16 parameters; it trains in float32: "
        "load it with from_pretrained(..., dtype=torch.float32)"
    )


def test_bf16_with_zero_stage_0_is_refused_before_any_rank() -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose(["train.precision=bf16", "zero.stage=0"]))
    assert str(err.value) == (
        "train.precision=bf16 is not accepted with zero.stage=0: DeepSpeed would accumulate and reduce "
        "gradients in bf16; accepted: zero.stage=1 (fp32 accumulation), or train.precision=fp32 or fp16 at "
        "ZeRO stage 0"
    )
    assert validate(compose(["train.precision=fp16", "zero.stage=0"])).zero.stage == 0
    assert validate(compose(["train.precision=bf16", "zero.stage=1"])).train.precision == "bf16"


def test_fp16_dynamic_loss_scaler_loads_from_a_checkpoint_file(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(
        init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False
    )
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter = 2.0**13, 7, 4
    path = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": scaler, "dynamic_loss_scale": True}}, path)
    loaded = checkpoint.SafeTorchCheckpointEngine().load(str(path))["optimizer_state_dict"]["loss_scaler"]
    assert type(loaded) is DynamicLossScaler
    assert (loaded.cur_scale, loaded.cur_iter, loaded.last_overflow_iter) == (2.0**13, 7, 4)


def test_only_values_the_cast_rounds_are_kept_and_frozen_ones_only_by_the_writer() -> None:
    exact = nn.Parameter(torch.tensor([1.0, 0.5, -3.0]))  # representable in bf16 and fp16
    rounded = nn.Parameter(torch.tensor([1.0 + 2.0**-12, 0.1]))  # not in either
    frozen = nn.Parameter(torch.tensor([0.1, 0.2]), requires_grad=False)
    module = nn.ParameterDict({"exact": exact, "rounded": rounded, "frozen": frozen})
    assert run_precision.rounded_by_cast(module, "fp32", writer=True) == {}
    for precision in ("bf16", "fp16"):
        kept = run_precision.rounded_by_cast(module, precision, writer=True)
        assert sorted(kept) == ["frozen", "rounded"]
        assert torch.equal(kept["rounded"], rounded.data) and kept["rounded"].dtype == torch.float32
        assert sorted(run_precision.rounded_by_cast(module, precision, writer=False)) == ["rounded"]


def test_frozen_values_the_folder_holds_are_read_again_not_kept(tmp_path: Path) -> None:
    from pipefit.model import lora as trainable

    folder, initial = saved_model(tmp_path, "llama")
    run = validate(compose(["model=local", f"model.path={folder}", "lora=qv", "lora.r=4"]))
    skeleton = make_skeleton(load_hf_config(str(folder), {}))
    layers = build_loaded(skeleton, folder, 0, len(layer_plan(skeleton)))
    trainable.add_lora(layers, skeleton, run.lora, seed=0)  # q/v become base_layer + adapters
    module = nn.ModuleList(layers)
    changed = layers[1].block.self_attn.o_proj.weight
    changed.data.add_(1e-3)  # frozen, but no longer what the folder holds: must be kept
    held = run_precision.FrozenFromFolder(module, skeleton, str(folder))
    kept = run_precision.rounded_by_cast(module, "bf16", writer=True, folder=held)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    trainable_names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable_names and all("lora_" in n for n in trainable_names)
    rounds = {n for n, p in module.named_parameters() if not torch.equal(p.data.bfloat16().float(), p.data)}
    # Kept: the adapters the cast rounds (each B starts at zero: exact) and the changed frozen matrix.
    assert set(kept) == (trainable_names & rounds) | {n for n, p in module.named_parameters() if p is changed}
    # Every other frozen value the cast rounds is read again (norm weights, all 1.0, are exact in bf16).
    assert len(held.names) == len(frozen & rounds) - 1 and len(held.names) > 10
    # At export: each layer's frozen values, read again, equal the folder's (the HF model's) exactly.
    by_id = {id(p): n for n, p in module.named_parameters()}
    reference = initial.state_dict()
    again = held.values(layers[1].parameters())
    q_base = layers[1].block.self_attn.q_proj.base_layer.weight
    assert torch.equal(again[id(q_base)], reference["model.layers.0.self_attn.q_proj.weight"])
    assert id(changed) not in again and len(again) == sum(1 for p in layers[1].parameters() if id(p) in held.names)
    assert all(by_id[i] in frozen for i in again)
    assert run_precision.rounded_by_cast(module, "bf16", writer=False, folder=None).keys() == trainable_names & rounds


class _Grid:
    def __init__(self, dp_rank: int) -> None:
        self.dp_rank = dp_rank

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_pipe_parallel_group(self) -> None:
        return None


def _engine(module: nn.Module, dp_rank: int = 0, **over: Any) -> SimpleNamespace:
    fields = {
        "module": module,
        "grid": _Grid(dp_rank),
        "device": torch.device("cpu"),
        "bfloat16_enabled": lambda: True,
        "fp16_enabled": lambda: False,
        "gradient_clipping": lambda: 0.5,
    }
    fields.update(over)
    return SimpleNamespace(**fields)


def test_master_weights_are_fetched_per_parameter_and_kept_by_dp_rank_0_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.utils

    module = nn.Linear(3, 2)
    masters = {id(p): torch.full(p.shape, 7.0) for p in module.parameters()}
    asked: list[int] = []

    def fake_get(param: nn.Parameter) -> torch.Tensor:
        asked.append(id(param))  # the collective: every dp rank must ask for the same parameters
        return masters[id(param)]

    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", fake_get)
    got = run_precision.master_weights(_engine(module), [module.weight])
    assert list(got) == [id(module.weight)] and torch.equal(got[id(module.weight)], masters[id(module.weight)])
    assert asked == [id(module.weight)]
    assert run_precision.master_weights(_engine(module, dp_rank=1)) == {}
    assert asked == [id(module.weight), id(module.weight), id(module.bias)]


def test_zero0_global_norm_clipping_uses_fused_norms_on_the_engine_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    torch.manual_seed(0)
    other_stage = nn.Linear(4, 4)
    this_stage = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for p in [*other_stage.parameters(), *this_stage.parameters()]:
        p.grad = torch.randn_like(p)
    # What one process clips over the whole model (the reference trainer's call).
    whole = [p.grad.clone() for p in [*other_stage.parameters(), *this_stage.parameters()]]
    expected_norm = float(torch.nn.utils.get_total_norm(whole))
    other_sq = float(sum(p.grad.pow(2).sum() for p in other_stage.parameters()))
    reduced: list[torch.Tensor] = []

    def fake_all_reduce(tensor: torch.Tensor, group: Any = None) -> None:
        reduced.append(tensor)
        tensor += other_sq  # the other stage's share of the squared norm

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    engine = _engine(this_stage)
    run_engine.install_global_norm_clipping(engine)
    before = [p.grad.clone() for p in this_stage.parameters()]
    engine.clip_fp32_gradients()
    assert reduced[0].dtype == torch.float32 and reduced[0].device == engine.device  # no fp64 copies
    assert engine._global_grad_norm == pytest.approx(expected_norm, rel=1e-6)
    coef = 0.5 / (engine._global_grad_norm + 1e-6)
    for p, g in zip(this_stage.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, g * coef, atol=0, rtol=1e-6)

    # A stage without gradients still joins the collective, with a zero on the engine's device.
    empty = nn.Linear(2, 2)
    engine = _engine(empty, device=torch.device("cpu"))
    run_engine.install_global_norm_clipping(engine)
    engine.clip_fp32_gradients()
    assert float(reduced[1]) == pytest.approx(other_sq) and reduced[1].dtype == torch.float32


# --- real ranks ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_folder_and_its_exact_fp32_upcast_train_identically(tmp_path: Path) -> None:
    """Default precision (fp32), pp=2: the folder's dtype changes nothing, bit for bit."""
    bf16, fp32, _ = _bf16_folder_and_upcast(tmp_path)
    losses = []
    for folder in (bf16, fp32):
        out = tmp_path / f"run-{folder.name}"
        proc = run_recipe(local_run(folder, out, 2, "train.save_every=0"))
        assert proc.returncode == 0, tail(proc)
        losses.append([m["loss"] for m in metrics(out)])
        part = json.loads((out / "partition.json").read_text())
        assert {r["param_dtype"] for r in part["ranks"]} == {"float32"}
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    # The export keeps each folder's dtype.
    shards = sorted((tmp_path / f"run-{bf16.name}" / "hf_model").glob("model-*.safetensors"))
    assert shards and {v.dtype for s in shards for v in load_file(s).values()} == {torch.bfloat16}


@pytest.mark.slow
def test_fp16_zero1_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """fp16 + ZeRO-1, pp=2: step 3 resumed from the step-2 checkpoint (its dynamic loss scaler included)."""
    require_precision("fp16")
    folder, _ = saved_model(tmp_path, "llama")
    common = ["train.precision=fp16", "zero.stage=1", "train.save_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_recipe(local_run(folder, straight, 3, *common))
    assert proc.returncode == 0, tail(proc)
    ckpt = checkpoint.checkpoint_root(straight) / checkpoint.tag_for(2)
    proc = run_recipe(local_run(folder, resumed, 3, *common, f"train.resume={ckpt}"))
    assert proc.returncode == 0, tail(proc)
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [3]
    assert b[0]["loss"] == a[2]["loss"]
    wa = AutoModelForCausalLM.from_pretrained(straight / "hf_model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "hf_model").state_dict()
    for k in wa:
        assert torch.equal(wb[k], wa[k]), k


@pytest.mark.slow
def test_bf16_lora_adapter_export_holds_the_fp32_masters(tmp_path: Path) -> None:
    """bf16 + ZeRO-1, pp=2, LoRA: hf_adapter/ holds the same fp32 masters that hf_model/ merged."""
    folder, initial = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    proc = run_recipe(local_run(folder, out, 2, "train.precision=bf16", "zero.stage=1", "lora=qv", "lora.r=4"))
    assert proc.returncode == 0, tail(proc)
    adapter = load_file(out / "hf_adapter" / "adapter_model.safetensors")
    config = json.loads((out / "hf_adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert len(adapter) == 2 * 2 * 3 and {v.dtype for v in adapter.values()} == {torch.float32}
    # Rounded training copies would all be bf16 values; the masters are not.
    assert all(not torch.equal(v.to(torch.bfloat16).float(), v) for v in adapter.values())
    merged = AutoModelForCausalLM.from_pretrained(out / "hf_model").state_dict()
    base = initial.state_dict()
    for name in [k for k in adapter if "lora_A" in k]:
        hf = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = scale * adapter[name.replace("lora_A", "lora_B")] @ adapter[name]
        assert float(delta.abs().max()) > 1e-5, hf
        torch.testing.assert_close(merged[hf], base[hf] + delta, atol=1e-7, rtol=0, msg=hf)
