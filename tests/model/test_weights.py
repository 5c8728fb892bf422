"""Safetensors in and out: export round trip, clear checkpoint errors, sharded reads that open only what is needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import FAMILIES, TIED_FAMILIES, random_tokens, run_layers, saved_model, tiny_hf_config
from pipefit.model import weights
from pipefit.model.hf import load_tokenizer, resolve_tokenizer_path
from pipefit.model.layer_list import build_layers, layer_plan, load_weights, make_skeleton, stage_layers
from pipefit.model.layers import EmbedLayer
from pipefit.model.weights import CheckpointError, SafetensorsReader, check_model_folder

TOL = {"atol": 1e-5, "rtol": 1e-5}
# Code, a non-ASCII word and runs of spaces: pre-tokenizers and normalisers disagree on these.
TEXT = "def main():\n    return 42  # exported Ünïcode"


def embedded_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_tokenizer_path(None, None))


def perturbed_stages(family: str, boundaries: list[int], seed: int) -> tuple[Any, list[list[Any]]]:
    """Randomly initialised stages, every tensor then nudged so that no two tensors are alike.

    Norm weights start as ones and biases as zeros; without the nudge an export that swapped
    two of them would still round-trip. A tied head on a later stage gets the embedding's
    values, as DeepSpeed keeps tied weights in sync.
    """
    skeleton = make_skeleton(tiny_hf_config(family), seed=seed)
    stages = [build_layers(skeleton, a, b) for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]
    generator = torch.Generator().manual_seed(seed + 1)
    embed = stages[0][0]
    assert isinstance(embed, EmbedLayer)
    with torch.no_grad():
        for layers in stages:
            for layer in stage_layers(nn.ModuleList(layers)):
                if isinstance(layer, EmbedLayer) and layer is not embed:
                    layer.embed_tokens.weight.copy_(embed.embed_tokens.weight)
                    continue
                for p in layer.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    for layers in stages:
        for layer in layers:
            layer.eval()
    return skeleton, stages


def export_stages(stages: list[list[Any]], hf_config: Any, out_dir: Path, token: str) -> dict[str, list[str]]:
    """What ``train.export_pipeline`` does, in one process: a shard per stage, then finalize."""
    staging = weights.staging_dir(out_dir, token)
    staging.mkdir(parents=True)
    shard_names: dict[str, list[str]] = {}
    for stage, layers in enumerate(stages):
        tensors: dict[str, torch.Tensor] = {}
        for layer in stage_layers(nn.ModuleList(layers)):
            if isinstance(layer, EmbedLayer) and stage != 0:
                continue  # a tied embedding is saved once, by the stage that owns the embedding
            tensors.update(weights.hf_state_dict(layer))
        filename = f"model-{stage + 1:05d}-of-{len(stages):05d}.safetensors"
        weights.write_shard(tensors, staging, filename)
        shard_names[filename] = sorted(tensors)
    weights.finalize_export(staging, out_dir, shard_names, hf_config, embedded_tokenizer())
    return shard_names


def pipeline_logits(stages: list[list[Any]], inputs: Any) -> torch.Tensor:
    out = inputs
    with torch.no_grad():
        for layers in stages:
            out = run_layers(layers, out)
    return out


def leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}."))


# -- export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_export_round_trip_through_from_pretrained(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(family)
    skeleton, stages = perturbed_stages(family, [0, 2, len(layer_plan(make_skeleton(cfg)))], seed=7)
    out_dir = tmp_path / "export"
    shard_names = export_stages(stages, skeleton.config, out_dir, token="a1")

    files = {p.name for p in out_dir.iterdir()}
    assert {"config.json", weights.INDEX_FILE, "tokenizer.json", "tokenizer_config.json"} <= files
    assert set(shard_names) <= files and len(shard_names) == 2
    assert leftovers(out_dir) == []
    index = json.loads((out_dir / weights.INDEX_FILE).read_text())
    written = {name: fname for fname, names in shard_names.items() for name in names}
    assert index["weight_map"] == written
    numel = sum(p.numel() for layers in stages for layer in layers for p in layer.parameters())
    tied_copy = cfg.vocab_size * cfg.hidden_size if family in TIED_FAMILIES else 0
    assert index["metadata"]["total_size"] == 4 * (numel - tied_copy)

    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    inputs = random_tokens(batch=2, seq=20, seed=4)
    with torch.no_grad():
        reloaded = model(input_ids=inputs[0], position_ids=inputs[1]).logits
    torch.testing.assert_close(reloaded, pipeline_logits(stages, inputs), **TOL)
    if family in TIED_FAMILIES:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    # The tokenizer files reproduce the training tokenizer (loaded with the class it was saved as).
    embedded = embedded_tokenizer()
    exported = type(embedded).from_pretrained(out_dir)
    assert len(exported) == len(embedded) == cfg.vocab_size
    assert exported(TEXT)["input_ids"] == embedded(TEXT)["input_ids"]


_QWEN2_TOKENIZER_OVERRIDE = (
    "known transformers behaviour, not fixable in the export: transformers 5 lists qwen2 in "
    "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS: AutoTokenizer ignores the saved "
    "tokenizer_class (TokenizersBackend) and builds Qwen2Tokenizer, whose own pre-tokenizer and NFC normaliser "
    "give different ids than the embedded tokenizer used in training"
)


def _auto_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize(
    ("loader", "family"),
    [
        *(
            pytest.param(
                _auto_tokenizer,
                f,
                id=f"auto-{f}",
                marks=[pytest.mark.xfail(strict=True, reason=_QWEN2_TOKENIZER_OVERRIDE)] if f == "qwen2" else [],
            )
            for f in FAMILIES
        ),
        # pipefit reloads a saved tokenizer as saved, whatever the model type (qwen2 included).
        *(pytest.param(load_tokenizer, f, id=f"pipefit-{f}") for f in FAMILIES),
    ],
)
def test_exported_folder_tokenizer_matches_training_tokenizer(tmp_path: Path, loader: Any, family: str) -> None:
    embedded = embedded_tokenizer()
    out_dir = tmp_path / "export"
    staging = weights.staging_dir(out_dir, "tok")
    staging.mkdir()
    weights.finalize_export(staging, out_dir, {}, tiny_hf_config(family), embedded)
    assert loader(out_dir)(TEXT)["input_ids"] == embedded(TEXT)["input_ids"]


def test_second_export_replaces_the_folder_completely(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config("llama")
    n = len(layer_plan(make_skeleton(cfg)))
    out_dir = tmp_path / "export"
    skeleton, first = perturbed_stages("llama", [0, 3, n], seed=1)
    export_stages(first, skeleton.config, out_dir, token="first")
    (out_dir / "stale.txt").write_text("from the first export")
    (out_dir / "model-00009-of-00009.safetensors").write_bytes(b"stale shard")

    skeleton, second = perturbed_stages("llama", [0, 2, 4, n], seed=2)
    export_stages(second, skeleton.config, out_dir, token="second")

    files = {p.name for p in out_dir.iterdir()}
    assert "stale.txt" not in files and "model-00009-of-00009.safetensors" not in files
    assert {f for f in files if f.endswith(".safetensors")} == {
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    }
    assert leftovers(out_dir) == [] and weights.is_previous_export(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    inputs = random_tokens(batch=2, seq=20, seed=4)
    with torch.no_grad():
        reloaded = model(input_ids=inputs[0], position_ids=inputs[1]).logits
    torch.testing.assert_close(reloaded, pipeline_logits(second, inputs), **TOL)
    assert (reloaded - pipeline_logits(first, inputs)).abs().max() > 1e-2


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_export_carries_the_marker_and_an_empty_folder_is_a_destination(tmp_path: Path) -> None:
    out_dir = tmp_path / "export"
    out_dir.mkdir()
    skeleton, stages = perturbed_stages("llama", [0, 3, len(layer_plan(make_skeleton(tiny_hf_config("llama"))))], 1)
    export_stages(stages, skeleton.config, out_dir, token="t")
    assert json.loads((out_dir / weights.EXPORT_MARKER).read_text()) == {"format": 1, "written_by": "pipefit"}
    assert weights.is_previous_export(out_dir) and leftovers(out_dir) == []


def test_export_over_a_folder_that_is_not_an_export_is_refused_and_nothing_touched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "layer_00-model_states.pt").write_bytes(b"\x00" * 1000)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 8.4}\n')
    (run / "train.log").write_text("step 1/4 loss 8.4\n")
    before = snapshot(run)
    skeleton, stages = perturbed_stages("llama", [0, 3, len(layer_plan(make_skeleton(tiny_hf_config("llama"))))], 1)
    with pytest.raises(weights.ExportDestinationError) as info:
        export_stages(stages, skeleton.config, run, token="t")
    assert str(info.value) == (
        f"out_dir={str(run)!r} is not empty (3 entries) and is not a previous pipefit export "
        "(no pipefit_export.json); nothing was written; give a new or empty folder, or move its contents away"
    )
    assert snapshot(run) == before and len(before) == 3
    assert leftovers(run) == []  # the staging folder is gone too
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    with pytest.raises(weights.ExportDestinationError) as info:
        weights.check_export_destination(afile)
    assert str(info.value) == (
        f"out_dir={str(afile)!r} is a file; nothing was written; expected a new folder, an empty one, "
        "or a previous pipefit export (with pipefit_export.json)"
    )
    assert afile.read_text() == "keep me"


# -- checkpoint errors -----------------------------------------------------------------------------


def _assert_one_line(error: pytest.ExceptionInfo[CheckpointError], *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError) as error:
        SafetensorsReader(missing)
    _assert_one_line(error, str(missing), "not a folder")
    with pytest.raises(CheckpointError):
        check_model_folder(missing)


def test_folder_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(CheckpointError) as error:
        SafetensorsReader(folder)
    _assert_one_line(error, str(folder), "config.json")


def test_folder_without_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    tiny_hf_config("llama").save_pretrained(folder)
    assert check_model_folder(folder) == folder
    with pytest.raises(CheckpointError) as error:
        SafetensorsReader(folder)
    _assert_one_line(error, str(folder), weights.SINGLE_FILE, weights.INDEX_FILE)


def _rewrite_checkpoint(folder: Path, edit: Any) -> None:
    path = folder / weights.SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_checkpoint_missing_a_tensor(tmp_path: Path) -> None:
    folder, _ = saved_model(tmp_path, "llama")
    _rewrite_checkpoint(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    skeleton = make_skeleton(tiny_hf_config("llama"))
    n = len(layer_plan(skeleton))

    # Stages that do not need the tensor still load.
    assert load_weights(nn.ModuleList(build_layers(skeleton, 3, n)), skeleton, folder) > 0
    with pytest.raises(CheckpointError) as error:
        load_weights(nn.ModuleList(build_layers(skeleton, 0, n)), skeleton, folder)
    _assert_one_line(error, str(folder), "model.layers.1.mlp.up_proj.weight", "1 tensor")


def _shrink_first_gate(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.0.mlp.gate_proj.weight"] = tensors["model.layers.0.mlp.gate_proj.weight"][:100].clone()


def test_checkpoint_tensor_with_wrong_shape_names_the_folder_tensor_and_shapes(tmp_path: Path) -> None:
    folder, _ = saved_model(tmp_path, "llama")
    _rewrite_checkpoint(folder, _shrink_first_gate)
    skeleton = make_skeleton(tiny_hf_config("llama"))
    with pytest.raises(CheckpointError) as error:
        load_weights(nn.ModuleList(build_layers(skeleton, 0, 3)), skeleton, folder)
    _assert_one_line(error, str(folder), "model.layers.0.mlp.gate_proj.weight", "(100, 64)", "(128, 64)", "config.json")


def test_tied_checkpoint_holding_only_the_head_weight_loads_the_embedding(tmp_path: Path) -> None:
    folder, model = saved_model(tmp_path, "llama_tied")

    def rename(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")

    _rewrite_checkpoint(folder, rename)
    skeleton = make_skeleton(tiny_hf_config("llama_tied"))
    (embed,) = build_layers(skeleton, 0, 1)
    load_weights(nn.ModuleList([embed]), skeleton, folder)
    torch.testing.assert_close(embed.embed_tokens.weight, model.get_input_embeddings().weight, atol=0, rtol=0)


def test_gpt_neox_checkpoint_naming_the_head_embed_out_loads(tmp_path: Path) -> None:
    # GPT-NeoX's head is the module lm_head, saved as embed_out (Pythia's hub checkpoints, and
    # transformers' own save_pretrained); from_pretrained maps one to the other, and so does pipefit.
    folder, model = saved_model(tmp_path, "gpt_neox")

    def rename(tensors: dict[str, torch.Tensor]) -> None:
        if "lm_head.weight" in tensors:
            tensors["embed_out.weight"] = tensors.pop("lm_head.weight")

    _rewrite_checkpoint(folder, rename)
    assert "lm_head.weight" not in SafetensorsReader(folder).weight_map
    skeleton = make_skeleton(tiny_hf_config("gpt_neox"))
    n = len(layer_plan(skeleton))
    (head,) = build_layers(skeleton, n - 1, n)
    load_weights(nn.ModuleList([head]), skeleton, folder)
    torch.testing.assert_close(head.lm_head.weight, model.get_output_embeddings().weight, atol=0, rtol=0)
    assert list(weights.hf_state_dict(head)) == ["lm_head.weight"]  # exported under today's name


# -- sharded checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def opened_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files ``pipefit.model.weights`` opens with ``safe_open``, in order."""
    opened: list[str] = []
    real_safe_open = weights.safe_open

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(weights, "safe_open", spy)
    return opened


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_sharded_checkpoint_loads_and_opens_only_needed_shards(
    tmp_path: Path, family: str, opened_files: list[str]
) -> None:
    folder, model = saved_model(tmp_path, family, max_shard_size="100KB")
    weight_map = json.loads((folder / weights.INDEX_FILE).read_text())["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) >= 4, f"expected a many-shard checkpoint, got {sorted(shards)}"
    skeleton = make_skeleton(tiny_hf_config(family))
    n = len(layer_plan(skeleton))

    # The index alone says where tensors live: opening the reader reads no shard.
    SafetensorsReader(folder)
    assert opened_files == []

    # The final norm lives in exactly one shard, and only that shard is opened.
    load_weights(nn.ModuleList(build_layers(skeleton, n - 2, n - 1)), skeleton, folder)
    assert opened_files == [weight_map["model.norm.weight"]]

    # One block: exactly the shards holding its tensors.
    opened_files.clear()
    (block,) = build_layers(skeleton, 2, 3)
    load_weights(nn.ModuleList([block]), skeleton, folder)
    needed = {weight_map[name] for name in weights.hf_state_dict(block)}
    assert set(opened_files) == needed and len(needed) < len(shards)

    # The head: the untied head's own shard, or (tied) the embedding's shard.
    opened_files.clear()
    build = build_layers(skeleton, n - 1, n)
    load_weights(nn.ModuleList(build), skeleton, folder)
    head_name = "model.embed_tokens.weight" if family in TIED_FAMILIES else "lm_head.weight"
    assert opened_files == [weight_map[head_name]]

    # And the whole sharded model gives HF's logits.
    layers = build_layers(skeleton, 0, n)
    load_weights(nn.ModuleList(layers), skeleton, folder)
    inputs = random_tokens(batch=2, seq=20)
    with torch.no_grad():
        expected = model(input_ids=inputs[0], position_ids=inputs[1]).logits
        logits = run_layers([layer.eval() for layer in layers], inputs)
    torch.testing.assert_close(logits, expected, **TOL)
