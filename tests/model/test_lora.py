"""Frozen parameters (``train.freeze``) and LoRA adapters (``lora``, through peft).

In one process: stage layers built the pipeline's way match the HF model frozen the same way and
``peft.get_peft_model`` wrapped with the same settings (same adapters, same initial values, same
logits; the merged export and the peft adapter folder both reproduce them); bad settings are
one-line errors. With real ranks (slow): a pipeline run with a frozen tied embedding, and a LoRA
run interrupted and resumed, each equal the single-process reference.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import random_tokens, run_layers, saved_model, tiny_hf_config
from launching import compose, local_run, losses_match, metrics, run_recipe, tail
from pipefit.config import ConfigError, LoraConfig, RunConfig, TrainConfig, validate
from pipefit.model import lora as trainable
from pipefit.model.layer_list import build_layers, layer_plan, load_weights, make_skeleton, stage_layers, tied_aliases
from pipefit.model.weights import finalize_export, hf_state_dict, write_shard


def _run(freeze: list[str] | None = None, lora: LoraConfig | None = None, seed: int = 7) -> RunConfig:
    return replace(RunConfig(), train=TrainConfig(seed=seed, freeze=freeze or []), lora=lora or LoraConfig())


def _stages(folder: Path, family: str, boundaries: list[int]) -> tuple[object, list[list[nn.Module]]]:
    """The model as pipeline stages, each built and loaded on its own (as on separate ranks)."""
    skeleton = make_skeleton(tiny_hf_config(family))
    stages = []
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        layers = build_layers(skeleton, start, stop)
        load_weights(nn.ModuleList(layers), skeleton, folder)
        stages.append(layers)
    return skeleton, stages


def _frozen_names(layers: list[nn.Module]) -> set[str]:
    out = set()
    for layer in stage_layers(nn.ModuleList(layers)):
        for local, prefix in layer.hf_prefixes.items():
            out |= {f"{prefix}.{k}" for k, p in getattr(layer, local).named_parameters() if not p.requires_grad}
    return out


def _fill(named: dict[str, torch.Tensor]) -> None:
    """Overwrite tensors with values seeded by their name, so two models get the same ones."""
    with torch.no_grad():
        for name, tensor in named.items():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.05)


# --- freezing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,patterns", [("llama_tied", ["lm_head.weight", r"model\.layers\.1\.mlp\..*"])])
def test_freeze_selects_the_reference_tensors_on_every_stage(tmp_path: Path, family: str, patterns: list[str]):
    folder, _ = saved_model(tmp_path, family)
    skeleton, stages = _stages(folder, family, [0, 2, 6])
    aliases = tied_aliases(skeleton)
    for layers in stages:
        trainable.freeze(stage_layers(nn.ModuleList(layers)), patterns, aliases)
    pipe = set().union(*(_frozen_names(layers) for layers in stages))
    reference = trainable.reference_model(AutoModelForCausalLM.from_pretrained(folder), _run(patterns))
    ref = {n for n, p in reference.named_parameters(remove_duplicate=False) if not p.requires_grad}
    # The tied head is frozen through its other name: the embedding on stage 0 and its copy on stage 1.
    assert ref == {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")
    }
    assert pipe == {n if n not in aliases or n == "model.embed_tokens.weight" else aliases[n] for n in ref}
    assert "model.embed_tokens.weight" in _frozen_names(stages[0]) and "model.embed_tokens.weight" in _frozen_names(
        stages[1]
    )
    trainable_names = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert "model.layers.1.self_attn.q_proj.weight" in trainable_names


def test_bad_freeze_settings_are_one_line_errors():
    skeleton = make_skeleton(tiny_hf_config("llama"))
    plan_len = len(layer_plan(skeleton))
    with pytest.raises(
        ConfigError,
        match=r"^train\.freeze: 'model\.embed\.weight' matches no parameter of this model; .*"
        r"e\.g\. model\.embed_tokens\.weight, model\.layers\.0\.",
    ):
        trainable.check(_run(["model.embed.weight"]), skeleton, None)
    with pytest.raises(ConfigError, match=r"^train\.freeze\[1\]='\(' is not a regular expression"):
        trainable.check(_run(["lm_head.weight", "("]), skeleton, None)
    # Stage 0 holds only the embedding: frozen whole, DeepSpeed would have no optimizer for it.
    with pytest.raises(
        ConfigError,
        match=r"^train\.freeze=\['model\.embed_tokens\.weight'\] freezes every parameter of pipeline stage 0 "
        r"\(layers \[0, 1\): 0:embed\)",
    ):
        trainable.check(_run(["model.embed_tokens.weight"]), skeleton, [0, 1, plan_len])
    trainable.check(_run(["model.embed_tokens.weight"]), skeleton, [0, 2, plan_len])  # a block keeps stage 0 busy
    with pytest.raises(ConfigError, match=r"cannot be combined with lora\.enabled=true"):
        trainable.check(_run(["lm_head.weight"], LoraConfig(enabled=True)), skeleton, None)

    # A run refuses them while preparing, before any process group exists.
    from pipefit.run.preflight import Prepared

    with pytest.raises(ConfigError, match=r"^train\.freeze: 'lm_head\.bias' matches no parameter"):
        Prepared(validate(compose(["train.freeze=[lm_head.bias]"])), 2)


# --- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,targets,boundaries",
    [
        ("llama", ["q_proj", "v_proj", "down_proj", "lm_head"], [0, 2, 6]),  # untied head adapted too
        ("gpt2", ["c_attn"], [0, 3, 6]),  # Conv1D (fan_in_fan_out), tied head
        ("qwen2", ["q_proj", "o_proj"], [0, 3, 7]),  # biased q: base_layer.bias must export as q_proj.bias
    ],
)
def test_lora_stages_equal_peft_model_and_both_exports_reload(
    tmp_path: Path, family: str, targets: list[str], boundaries: list[int]
):
    from peft import PeftModel, get_peft_model_state_dict

    folder, _ = saved_model(tmp_path, family)
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=targets)
    run = _run(lora=lora)
    skeleton, stages = _stages(folder, family, boundaries)
    for layers in stages:
        trainable.add_lora(stage_layers(nn.ModuleList(layers)), skeleton, lora, run.train.seed)
    reference = trainable.reference_model(AutoModelForCausalLM.from_pretrained(folder), run).eval()

    # Same adapters with bit-identical initial values, though each stage was built on its own.
    # (peft would also save an adapted lm_head's base weight, as for embeddings: not an adapter tensor.)
    ref_adapter = get_peft_model_state_dict(reference, save_embedding_layers=False)
    pipe_layers = [layer for layers in stages for layer in stage_layers(nn.ModuleList(layers))]
    pipe_adapter: dict[str, torch.Tensor] = {}
    for layer in pipe_layers:
        pipe_adapter.update(trainable.adapter_state_dict(layer))
    assert set(pipe_adapter) == set(ref_adapter) and len(pipe_adapter) == 2 * len(
        trainable.lora_targets(lora, skeleton)
    )
    for name, tensor in ref_adapter.items():
        assert torch.equal(pipe_adapter[name], tensor), name
    assert any(float(t.abs().max()) > 0 for n, t in ref_adapter.items() if "lora_A" in n)
    # Only the adapters train.
    trainable_names = {n for layer in pipe_layers for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable_names and all(".lora_A." in n or ".lora_B." in n for n in trainable_names)

    # Non-zero B everywhere (as after training): the stages' logits equal the peft model's.
    _fill(pipe_adapter)
    _fill({re.sub(r"\.default\.", ".", n): p.data for n, p in reference.named_parameters() if "lora_" in n})
    ids, pos = random_tokens()
    layers = [layer for s in stages for layer in s]
    with torch.no_grad():
        for layer in layers:
            layer.eval()
        pipe_logits = run_layers(layers, (ids, pos))
        ref_logits = reference(input_ids=ids, position_ids=pos).logits
    with reference.disable_adapter(), torch.no_grad():
        base_logits = reference(input_ids=ids, position_ids=pos).logits
    assert float((ref_logits - base_logits).abs().max()) > 1e-2  # the adapters change the output
    torch.testing.assert_close(pipe_logits, ref_logits, atol=1e-5, rtol=1e-5)

    # Merged export (the pipeline's own export path): a plain HF folder with the adapters folded in.
    tensors: dict[str, torch.Tensor] = {}
    for layer in pipe_layers:
        tensors.update(hf_state_dict(layer))
    assert not any("lora" in n or "base_layer" in n for n in tensors)
    staging, merged_dir = tmp_path / "staging", tmp_path / "merged"
    write_shard(tensors, staging, "model-00001-of-00001.safetensors")
    finalize_export(staging, merged_dir, {"model-00001-of-00001.safetensors": sorted(tensors)}, skeleton.config, None)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    # The peft adapter folder.
    adapter_dir = tmp_path / "adapter"
    trainable.write_adapter_folder(pipe_adapter, lora, skeleton, adapter_dir, str(folder))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, position_ids=pos).logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(input_ids=ids, position_ids=pos).logits, ref_logits, atol=0, rtol=0)


def test_bad_lora_settings_are_one_line_errors():
    llama = make_skeleton(tiny_hf_config("llama"))
    gpt2 = make_skeleton(tiny_hf_config("gpt2"))
    tied = make_skeleton(tiny_hf_config("llama_tied"))

    def check(skeleton, boundaries=None, **lora):
        trainable.check(_run(lora=LoraConfig(enabled=True, **lora)), skeleton, boundaries)

    with pytest.raises(
        ConfigError, match=r"^lora\.target_modules: 'q_proj' matches no module of this model; .*c_attn, c_fc, c_proj$"
    ):
        check(gpt2, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"'embed_tokens' matches model\.embed_tokens, outside the decoder blocks"):
        check(llama, target_modules=["embed_tokens"])
    with pytest.raises(ConfigError, match=r"'lm_head' matches lm_head, outside the decoder blocks"):
        check(tied, target_modules=["lm_head"])  # tied: the head is the embedding
    with pytest.raises(ConfigError, match=r"'mlp' matches model\.layers\.0\.mlp \(LlamaMLP\), not a Linear layer"):
        check(llama, target_modules=["mlp"])
    with pytest.raises(ConfigError, match=r"^lora\.r=0 is not accepted"):
        check(llama, r=0)
    with pytest.raises(ConfigError, match=r"^lora\.target_modules is empty"):
        check(llama, target_modules=[])
    with pytest.raises(
        ConfigError,
        match=r"^lora\.target_modules=\['q_proj', 'v_proj'\] puts no adapter on pipeline stage 1 "
        r"\(layers \[4, 6\): 4:norm, 5:head\)",
    ):
        check(llama, [0, 4, 6])
    check(llama, [0, 3, 6])


def test_resume_needs_the_checkpoints_lora_and_frozen_settings(tmp_path: Path):
    lora = LoraConfig(enabled=True, r=4, target_modules=["q_proj"])
    saved = {"lora": {"enabled": True, "r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]}}
    saved["train"] = {"freeze": []}
    trainable.check_resume(_run(lora=lora), saved, tmp_path, same_shape=True)
    with pytest.raises(ConfigError, match=r"^lora=off differs from the checkpoint's lora=\(r=4, alpha=16"):
        trainable.check_resume(_run(), saved, tmp_path, same_shape=False)
    with pytest.raises(ConfigError, match=r"^lora=\(r=8, .* differs from the checkpoint's lora=\(r=4"):
        trainable.check_resume(_run(lora=replace(lora, r=8)), saved, tmp_path, same_shape=False)
    plain = {"train": {"freeze": ["lm_head.weight"]}}
    trainable.check_resume(_run(), plain, tmp_path, same_shape=False)  # new shape: weights only
    with pytest.raises(ConfigError, match=r"^train\.freeze=\[\] differs from the checkpoint's \['lm_head\.weight'\]"):
        trainable.check_resume(_run(), plain, tmp_path, same_shape=True)


# --- real ranks ----------------------------------------------------------------------------------

STEPS = 4


def _overrides(folder: Path, out: Path, zero: int, extra: list[str]) -> list[str]:
    return local_run(
        folder, out, STEPS, f"zero.stage={zero}", "pipeline.partition=manual", "pipeline.boundaries=[0,3,6]", *extra
    )


def _reference(folder: Path, overrides: list[str]) -> tuple[object, object, list[float]]:
    from pipefit.parity.reference import train_reference
    from pipefit.run.preflight import Prepared

    run = validate(compose(overrides))
    prepared = Prepared(run, 2)
    model = trainable.reference_model(AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa"), run)
    return prepared, model, train_reference(model, run, prepared.batches, STEPS)


@pytest.mark.slow
def test_frozen_tied_embedding_pipeline_equals_reference(tmp_path: Path):
    """pp=2, ZeRO-0: the tied embedding (both stages) and one MLP frozen; the rest trains as in one process."""
    folder, initial = saved_model(tmp_path, "llama_tied")
    out = tmp_path / "run"
    freeze = ["train.freeze=[model.embed_tokens.weight,model.layers.0.mlp.*]"]
    overrides = _overrides(folder, out, 0, freeze)
    proc = run_recipe(overrides)
    assert proc.returncode == 0, tail(proc)
    prepared, reference, ref_losses = _reference(folder, overrides)
    rel = losses_match(out, ref_losses, STEPS)
    print("losses:", [m["loss"] for m in metrics(out)], "max relative difference to the reference:", rel)

    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model").state_dict()
    ref_sd, init_sd = reference.state_dict(), initial.state_dict()
    frozen = {"model.embed_tokens.weight", "lm_head.weight"} | {
        k for k in init_sd if k.startswith("model.layers.0.mlp.")
    }
    for k in ref_sd:
        torch.testing.assert_close(exported[k], ref_sd[k], atol=2e-5, rtol=1e-4, msg=k)
        moved = float((exported[k] - init_sd[k]).abs().max())
        if k in frozen:
            assert torch.equal(exported[k], init_sd[k]), k  # bit-identical to the loaded weights
        elif k.endswith("proj.weight"):
            assert moved > 1e-4, (k, moved)
    # No optimizer state for frozen tensors: Adam's 8 bytes per trainable parameter only.
    part = json.loads((out / "partition.json").read_text())
    skeleton = prepared.skeleton
    for r in part["ranks"]:
        names = [n for info in prepared.plan[slice(*r["layers"])] for n in trainable._layer_param_names(skeleton, info)]
        counted = {n: skeleton.model.get_parameter(n).numel() for n in names if n not in frozen}
        assert r["optimizer_state_bytes"] == 8 * sum(counted.values()), (r, sorted(counted))


@pytest.mark.slow
def test_lora_pipeline_equals_peft_reference_and_its_checkpoints_carry_the_adapters(tmp_path: Path):
    """pp=2, ZeRO-1, tied (frozen) embedding: LoRA on q/v equals peft in one process; both exports reload."""
    from peft import PeftModel, get_peft_model_state_dict

    from pipefit.parity.reference import train_reference
    from pipefit.run import checkpoint
    from pipefit.run.export import export

    folder, _ = saved_model(tmp_path, "llama_tied")
    out = tmp_path / "run"
    overrides = _overrides(folder, out, 1, ["lora=qv", "lora.r=4", "train.save_every=2"])
    proc = run_recipe(overrides)
    assert proc.returncode == 0, tail(proc)
    prepared, reference, ref_losses = _reference(folder, overrides)
    rel = losses_match(out, ref_losses, STEPS)
    print("losses:", [m["loss"] for m in metrics(out)], "max relative difference to the reference:", rel)

    # The adapter folder holds the reference's trained adapters; every B moved away from its zero init.
    adapter = load_file(out / trainable.ADAPTER_DIR / "adapter_model.safetensors")
    ref_adapter = get_peft_model_state_dict(reference)
    assert set(adapter) == set(ref_adapter) and len(adapter) == 2 * 2 * 3
    for k, v in ref_adapter.items():
        torch.testing.assert_close(adapter[k], v, atol=2e-5, rtol=1e-4, msg=k)
    assert min(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-4

    # Merged hf_model/ (plain transformers) and hf_adapter/ (peft) both give the reference's logits.
    probe = load_file(out / "hf_model" / "pipeline_probe.safetensors")
    ids, pos = probe["input_ids"], probe["position_ids"]
    merged = AutoModelForCausalLM.from_pretrained(out / "hf_model").eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out / trainable.ADAPTER_DIR)
    with torch.no_grad():
        ref_logits = reference.eval()(input_ids=ids, position_ids=pos).logits
        for model in (merged, loaded.eval()):
            torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(probe["logits"], ref_logits, atol=1e-4, rtol=1e-4)

    # The step-2 checkpoint's layer files carry the adapters: loaded the way a resume on another
    # shape loads them, they equal the reference after 2 steps.
    ckpt2 = out / "checkpoints" / checkpoint.tag_for(2)
    skeleton = prepared.skeleton
    module = nn.ModuleList(build_layers(skeleton, 0, len(prepared.plan) - 1))  # tied head: no file of its own
    trainable.add_lora(stage_layers(module), skeleton, prepared.run.lora, seed=0)
    checkpoint.load_layers(module, ckpt2)
    run = prepared.run
    two_steps = trainable.reference_model(AutoModelForCausalLM.from_pretrained(folder), run)
    train_reference(two_steps, run, prepared.batches, 2)
    at_two = get_peft_model_state_dict(two_steps)
    loaded_two: dict[str, torch.Tensor] = {}
    for layer in stage_layers(module):
        loaded_two.update(trainable.adapter_state_dict(layer))
    assert set(loaded_two) == set(at_two)
    for k, v in at_two.items():
        torch.testing.assert_close(loaded_two[k], v, atol=2e-5, rtol=1e-4, msg=k)
        assert not torch.allclose(v, ref_adapter[k], atol=1e-4), k  # steps 3-4 moved every adapter further

    # pipefit export from the final checkpoint == the run's merged export.
    export(out / "checkpoints" / checkpoint.tag_for(STEPS), tmp_path / "from_ckpt")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ckpt").state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(a[k], v, atol=0, rtol=0, msg=k)
