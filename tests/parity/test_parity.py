"""Pipeline layers vs the unmodified Hugging Face model: CPU, fp32, one process.

Every registered family and task is covered: the whole layer list, every 2- and 3-stage split (each
stage built and loaded on its own, as a rank would), the loss function, and HF-like random init. The
reference model, its output shape and its document masking are read from the family's task
(:mod:`pipefit.model.tasks`), so the BERT presets (masked LM, classification) run the same tests.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    FAMILIES,
    TIED_FAMILIES,
    build_loaded,
    random_tokens,
    reference_class,
    run_layers,
    saved_model,
    task_of_family,
    tiny_hf_config,
)
from pipefit.model import adapters
from pipefit.model.hf import set_attn_implementation
from pipefit.model.layer_list import build_layers, layer_plan, make_skeleton, stage_layers
from pipefit.model.layers import IGNORE_INDEX, BlockLayer, causal_lm_loss
from pipefit.model.tasks import SEQUENCE_CLASSIFICATION, TASKS
from pipefit.model.weights import hf_state_dict
from pipefit.parity.reference import DocumentMasked

TOL = {"atol": 1e-5, "rtol": 1e-5}


def hf_logits(model: Any, inputs: tuple[torch.Tensor, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    input_ids, position_ids = inputs
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits


def output_shape(family: str, config: Any, batch: int, seq: int) -> tuple[int, ...]:
    """The head's output: a label score per row for classification, a vocabulary score per token otherwise."""
    if task_of_family(family).name == SEQUENCE_CLASSIFICATION:
        return (batch, config.num_labels)
    return (batch, seq, config.vocab_size)


def head_input_shape(family: str, model: Any, batch: int, seq: int) -> tuple[int, ...]:
    """What the head layer receives: the pooled first token for classification, else every token
    (projected to the head's width where the family projects: OPT's project_out)."""
    if task_of_family(family).name == SEQUENCE_CLASSIFICATION:
        return (batch, model.config.hidden_size)
    return (batch, seq, model.get_output_embeddings().weight.shape[1])


def tied_names(layer: nn.Module, config: Any) -> list[str]:
    """The names, inside the embed ``layer``, of what a tied head shares: the token embedding (first)
    and, where the head has one, its output bias (BERT's masked-LM head)."""
    return [n for n, p in layer.named_parameters() if p.shape[0] == config.vocab_size]


# -- coverage of the registry ---------------------------------------------------------------------


def test_every_registered_config_class_is_tested() -> None:
    tested = {type(tiny_hf_config(f)).__name__ for f in FAMILIES}
    decoders = [a for a in adapters.registered_adapters() if getattr(a, "kind", "decoder") == "decoder"]
    untested = {c for a in decoders for c in a.config_classes} - tested
    assert not untested, f"registered adapter config classes without a parity family in conftest: {sorted(untested)}"
    # Encoder families (BERT) are in the family list too.
    encoders = {c for a in adapters.registered_adapters() if a.kind == "encoder" for c in a.config_classes}
    assert encoders <= tested, f"encoder classes without a family in conftest: {sorted(encoders - tested)}"
    # Every task is some family's task.
    assert {task_of_family(f).name for f in FAMILIES} == set(TASKS)
    # Tied and untied heads, and a sliding window, are each exercised at least once.
    assert TIED_FAMILIES & set(FAMILIES) and set(FAMILIES) - TIED_FAMILIES
    assert any(getattr(tiny_hf_config(f), "sliding_window", None) for f in FAMILIES)
    # Every adapter field a family sets away from its default is exercised by some tested family.
    skeletons = {f: make_skeleton(tiny_hf_config(f)) for f in FAMILIES}
    for field in dataclasses.fields(adapters.Adapter):
        default = field.default
        if field.name == "kind" or default is dataclasses.MISSING:
            continue
        used = {a.name for a in decoders if getattr(a, field.name) != default}
        tested_with = {f for f, sk in skeletons.items() if getattr(sk.adapter, field.name) != default}
        if used:
            assert tested_with, f"Adapter.{field.name} is set by {sorted(used)} but no tested family exercises it"
    # The optional submodules exist in the tested configs (OPT's projections, Gemma-2's soft-cap).
    assert all(skeletons["opt"].has(p) for p in ("model.decoder.project_in", "model.decoder.project_out"))
    assert skeletons["gemma2"].adapter.final_logit_softcap(skeletons["gemma2"].config) is not None


def test_unknown_family_error_lists_supported_classes() -> None:
    from transformers import T5Config

    with pytest.raises(adapters.UnknownFamilyError) as info:
        adapters.for_config(T5Config())
    message = str(info.value)
    assert "\n" not in message
    assert "T5Config" in message
    supported = adapters.supported_config_classes()
    assert len(supported) >= 4
    for cls_name in supported:
        assert cls_name in message


# -- logits parity ---------------------------------------------------------------------------------


def test_full_pipeline_matches_hf_logits(tmp_path: Path, family: str) -> None:
    folder, model = saved_model(tmp_path, family)
    skeleton = make_skeleton(tiny_hf_config(family))
    n = len(layer_plan(skeleton))
    layers = build_loaded(skeleton, folder, 0, n)
    inputs = random_tokens(batch=2, seq=20)

    with torch.no_grad():
        logits = run_layers(layers, inputs)

    expected = hf_logits(model, inputs)
    assert logits.shape == output_shape(family, model.config, 2, 20)
    torch.testing.assert_close(logits, expected, **TOL)


def _stage_splits(num_layers: int) -> list[tuple[int, ...]]:
    """Every split of ``num_layers`` layers into 2 or 3 non-empty contiguous stages, as boundaries."""
    splits = []
    for num_stages in (2, 3):
        for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
            splits.append((0, *cuts, num_layers))
    return splits


def test_every_stage_split_matches_hf_logits(tmp_path: Path, family: str) -> None:
    folder, model = saved_model(tmp_path, family)
    skeleton = make_skeleton(tiny_hf_config(family))
    n = len(layer_plan(skeleton))
    inputs = random_tokens(batch=2, seq=20)
    expected = hf_logits(model, inputs)
    splits = _stage_splits(n)
    assert len(splits) == (n - 1) + (n - 1) * (n - 2) // 2

    built: dict[tuple[int, int], list[Any]] = {}
    for bounds in splits:
        out: Any = inputs
        for stage, (start, stop) in enumerate(itertools.pairwise(bounds)):
            if (start, stop) not in built:
                built[(start, stop)] = build_loaded(skeleton, folder, start, stop)
            with torch.no_grad():
                out = run_layers(built[(start, stop)], out)
            if stop < n - 1:
                # Only the float hidden states and the integer position ids cross a boundary.
                hidden, position_ids = out
                assert hidden.dtype == torch.float32 and hidden.shape == (2, 20, model.config.hidden_size)
                assert torch.equal(position_ids, inputs[1]), f"stage {stage} of {bounds} changed position ids"
            elif stop == n - 1:
                # A stage ending with the final norm hands the head only the normalised hidden states
                # (projected to the head's width where the family projects: OPT's project_out).
                assert isinstance(out, torch.Tensor) and out.shape == head_input_shape(family, model, 2, 20)
        torch.testing.assert_close(out, expected, **TOL, msg=lambda m, b=bounds: f"split {b}: {m}")


@pytest.mark.parametrize("family", sorted(TIED_FAMILIES))
def test_tied_head_on_its_own_stage_uses_the_checkpoint_embedding(tmp_path: Path, family: str) -> None:
    folder, model = saved_model(tmp_path, family)
    skeleton = make_skeleton(tiny_hf_config(family))
    n = len(layer_plan(skeleton))
    (head,) = build_loaded(skeleton, folder, n - 1, n)
    (embed,) = build_layers(skeleton, 0, 1)
    # A head-only stage holds just the tied weight (no position embedding, no dropout) ...
    assert type(head.embed) is type(embed)
    assert [name for name, _ in head.named_parameters()] == [f"embed.{n}" for n in tied_names(embed, model.config)]
    if skeleton.task == "causal_lm":
        assert [name for name, _ in head.named_parameters()] == ["embed.embed_tokens.weight"]
    # ... and that weight is the checkpoint's embedding, not the random init.
    tied = head.embed.get_parameter(tied_names(embed, model.config)[0])
    torch.testing.assert_close(tied, model.get_input_embeddings().weight, atol=0, rtol=0)


def _windowed(tmp_path: Path, family: str, kinds: list[str]) -> tuple[Path, Any, Any, Any, Any, list[Any]]:
    """A saved sliding-window family whose window is shorter than the inputs, and its loaded layer list,
    whose blocks have the attention ``kinds``: ``(folder, model, cfg, inputs, skeleton, layers)``."""
    folder, model = saved_model(tmp_path, family)
    cfg = tiny_hf_config(family)
    inputs = random_tokens(batch=2, seq=20)
    assert cfg.sliding_window < inputs[0].shape[1]
    skeleton = make_skeleton(cfg)
    layers = build_loaded(skeleton, folder, 0, len(layer_plan(skeleton)))
    assert [b.attention_kind for b in layers if isinstance(b, BlockLayer)] == kinds
    return folder, model, cfg, inputs, skeleton, layers


def _two_documents() -> torch.Tensor:
    """Position ids of two packed documents (12 and 8 tokens) in each of 2 rows of 20."""
    return torch.cat([torch.arange(12), torch.arange(8)]).expand(2, 20).contiguous()


def test_mistral_sliding_window_is_exercised(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, model, cfg, inputs, _, _ = _windowed(tmp_path, "mistral", ["sliding_attention"] * 3)

    # Without the window the same weights give clearly different logits past the window,
    # so the parity tests above would fail if the pipeline ignored it.
    full = AutoModelForCausalLM.from_pretrained(folder, sliding_window=None).eval()
    windowed = hf_logits(model, inputs)
    unwindowed = hf_logits(full, inputs)
    torch.testing.assert_close(windowed[:, : cfg.sliding_window], unwindowed[:, : cfg.sliding_window], **TOL)
    assert (windowed[:, cfg.sliding_window :] - unwindowed[:, cfg.sliding_window :]).abs().max() > 1e-3


def _variant_parity(tmp_path: Path, family: str, splits: list[tuple[int, ...]], **overrides: Any) -> list[Any]:
    """A family's tiny config with ``overrides``: HF logits vs the whole layer list and each split.

    Returns the whole layer list (loaded).
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path / f"{family}-variant"
    model.save_pretrained(folder)
    skeleton = make_skeleton(cfg)
    n = len(layer_plan(skeleton))
    inputs = random_tokens(batch=2, seq=20)
    expected = hf_logits(model, inputs)
    whole = build_loaded(skeleton, folder, 0, n)
    for bounds in [(0, n), *splits]:
        out: Any = inputs
        for start, stop in itertools.pairwise(bounds):
            layers = whole if (start, stop) == (0, n) else build_loaded(skeleton, folder, start, stop)
            with torch.no_grad():
                out = run_layers(layers, out)
        torch.testing.assert_close(out, expected, **TOL, msg=lambda m, b=bounds: f"split {b}: {m}")
    return whole


def test_gemma2_soft_caps_and_alternating_windows_are_exercised(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, model, cfg, inputs, skeleton, layers = _windowed(
        tmp_path, "gemma2", ["sliding_attention", "full_attention"] * 2
    )
    n = len(layers)
    expected = hf_logits(model, inputs)
    with torch.no_grad():
        hidden = run_layers(layers[:-1], inputs)
        (head,) = build_loaded(skeleton, folder, n - 1, n)  # the tied head on a stage of its own
        capped = head(hidden)
    torch.testing.assert_close(capped, expected, **TOL)
    assert float(capped.abs().max()) < cfg.final_logit_softcapping
    # Each feature moves HF's logits far beyond the parity tolerance, so the parity tests need it.
    for override in ({"final_logit_softcapping": None}, {"attn_logit_softcapping": None}, {"sliding_window": 64}):
        other = AutoModelForCausalLM.from_pretrained(folder, **override).eval()
        assert (hf_logits(other, inputs) - expected).abs().max() > 1e-3, override
    # An untied head soft-caps as well.
    untied = _variant_parity(tmp_path, "gemma2", [(0, n - 1, n), (0, 3, n - 1, n)], tie_word_embeddings=False)
    assert type(untied[-1]).__name__ == "HeadLayer" and untied[-1].final_logit_softcap == cfg.final_logit_softcapping


def test_opt_without_final_norm_or_projections(tmp_path: Path) -> None:
    # do_layer_norm_before=False (OPT-350m) drops the final norm; equal widths drop project_in/out.
    cfg = tiny_hf_config("opt")
    layers = _variant_parity(
        tmp_path, "opt", [(0, 2, 6), (0, 4, 5, 6)], do_layer_norm_before=False, word_embed_proj_dim=cfg.hidden_size
    )
    embed, norm = layers[0], layers[-2]
    assert embed.project_in is None and embed.position_embed is not None
    assert norm.norm is None and norm.project_out is None and not list(norm.parameters())


def test_sdpa_on_a_family_without_it_is_one_clear_line() -> None:
    cfg = tiny_hf_config("gemma2")
    cfg._attn_implementation = "sdpa"
    with pytest.raises(ValueError) as info:
        make_skeleton(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert "model.attn_implementation='sdpa'" in message and "Gemma2ForCausalLM" in message and "eager" in message


@pytest.mark.parametrize(
    ("family", "requested", "chosen"),
    [("llama", None, "sdpa"), ("gemma2", None, "eager"), ("gpt2", None, "sdpa"), ("llama", "eager", "eager")],
)
def test_attention_left_unset_is_chosen_as_from_pretrained_does(family: str, requested: Any, chosen: str) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(family)
    assert set_attn_implementation(cfg, requested) == chosen == cfg._attn_implementation
    make_skeleton(cfg)  # builds: an unset choice never lands on one the family refuses
    if requested is None:
        assert AutoModelForCausalLM.from_config(tiny_hf_config(family)).config._attn_implementation == chosen


def test_reset_position_ids_isolate_packed_documents(tmp_path: Path, family: str) -> None:
    # Position ids that restart mark packed documents: each stage rebuilds a mask that keeps
    # them apart, as HF does without a KV cache (use_cache=False, the training setting).
    folder, model = saved_model(tmp_path, family)
    skeleton = make_skeleton(tiny_hf_config(family))
    layers = build_loaded(skeleton, folder, 0, len(layer_plan(skeleton)))
    input_ids, _ = random_tokens(batch=2, seq=20)
    position_ids = _two_documents()

    with torch.no_grad():
        logits = run_layers(layers, (input_ids, position_ids))

    # HF's encoders ignore position ids when masking: their reference applies the pipeline's document mask.
    reference = DocumentMasked(model) if task_of_family(family).bidirectional else model
    torch.testing.assert_close(logits, hf_logits(reference, (input_ids, position_ids), use_cache=False), **TOL)
    if task_of_family(family).name == SEQUENCE_CLASSIFICATION:
        # One score per row, read from the first document's first token: the second cannot reach it.
        torch.testing.assert_close(logits, hf_logits(model, (input_ids[:, :12], position_ids[:, :12])), **TOL)
        assert (logits - hf_logits(model, (input_ids, torch.arange(20).expand(2, 20)))).abs().max() > 1e-4
        return
    second_alone = hf_logits(model, (input_ids[:, 12:], position_ids[:, 12:]))
    if skeleton.adapter.mask_uses_position_ids:
        torch.testing.assert_close(logits[:, 12:], second_alone, **TOL)
    else:
        # OPT's HF forward builds its mask without the position ids: the second document sees the
        # first, in HF and (mirrored) in the pipeline alike.
        assert (logits[:, 12:] - second_alone).abs().max() > 1e-4


def test_masks_are_built_once_per_micro_batch_and_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF's packed-document scan (a host sync) runs once per micro-batch and stage, not once per block,
    and not at all for concat rows; the logits are bit-identical to masks built block by block."""
    import transformers.masking_utils as masking_utils

    from pipefit.model.layers import MaskCache

    scans: list[int] = []
    real = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: scans.append(p.shape[0]) or real(p))
    skeleton = make_skeleton(tiny_hf_config("llama"))
    n = len(layer_plan(skeleton))
    layers = build_layers(skeleton, 0, n)
    blocks = [x for x in layers if isinstance(x, BlockLayer)]
    assert len(blocks) == 3
    input_ids, arange = random_tokens(batch=2, seq=20)
    packed = _two_documents()
    with torch.no_grad():
        first = run_layers(layers, (input_ids, packed))
        second = run_layers(layers, (input_ids, packed.clone()))  # the next micro-batch: a new tensor
        assert scans == [2, 2]
        for block in blocks:  # one mask per block: the path without the cache
            block.masks = MaskCache()
        scans.clear()
        per_block = run_layers(layers, (input_ids, packed))
        assert scans == [2, 2, 2]
        assert torch.equal(first, per_block) and torch.equal(second, per_block)

        scans.clear()
        detected = run_layers(layers, (input_ids, arange))
        assert scans == [2, 2, 2]
        skeleton.one_document_per_row = True  # data.layout=concat
        concat_layers = build_layers(skeleton, 0, n)
        scans.clear()
        assert torch.equal(run_layers(concat_layers, (input_ids, arange)), detected)
        assert scans == []


# -- loss ------------------------------------------------------------------------------------------


def _targets_with_ignored(input_ids: torch.Tensor, seed: int = 5) -> torch.Tensor:
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    ignored = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    targets[ignored] = IGNORE_INDEX
    return targets


def test_causal_lm_loss_is_token_mean_with_unit_scale(tmp_path: Path) -> None:
    _, model = saved_model(tmp_path, "llama")
    inputs = random_tokens(batch=2, seq=20)
    logits = hf_logits(model, inputs)
    targets = _targets_with_ignored(inputs[0])
    valid = targets != IGNORE_INDEX
    num_targets = int(valid.sum())
    assert 0 < num_targets < 2 * 19  # some random positions are ignored besides the last

    loss = causal_lm_loss(logits, (targets, torch.tensor([1.0 / num_targets])))

    # By hand: mean over predicted tokens of -log softmax(logits)[target].
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    by_hand = -log_probs[valid].gather(-1, targets[valid].unsqueeze(-1)).mean()
    torch.testing.assert_close(loss.double(), by_hand, atol=1e-5, rtol=1e-5)
    mean = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, mean, **TOL)
    # HF's own loss takes unshifted labels: position t+1's token is the target at t.
    labels = torch.full_like(inputs[0], IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    with torch.no_grad():
        hf_loss = model(input_ids=inputs[0], position_ids=inputs[1], labels=labels).loss
    torch.testing.assert_close(loss, hf_loss, **TOL)


def test_causal_lm_loss_scale_makes_global_token_mean(tmp_path: Path) -> None:
    # Two micro-batches averaged (as DeepSpeed does over accumulation steps) with
    # scale = micro_batches / targets_in_global_batch give the token mean of the whole batch.
    _, model = saved_model(tmp_path, "gpt2")
    inputs = random_tokens(batch=4, seq=20, seed=3)
    logits = hf_logits(model, inputs)
    targets = _targets_with_ignored(inputs[0], seed=9)
    targets[2:, 3:] = IGNORE_INDEX  # the micro-batches have very different target counts
    total = int((targets != IGNORE_INDEX).sum())
    scale = torch.tensor([2.0 / total])

    summed = causal_lm_loss(logits, (targets, torch.tensor([1.0])))
    micro = [causal_lm_loss(logits[rows], (targets[rows], scale)) for rows in (slice(0, 2), slice(2, 4))]

    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(summed, reference * total, **TOL)
    torch.testing.assert_close((micro[0] + micro[1]) / 2, reference, **TOL)
    # The naive mean of per-micro-batch means would differ.
    means = [F.cross_entropy(logits[r].flatten(0, 1), targets[r].flatten()) for r in (slice(0, 2), slice(2, 4))]
    assert abs(float((means[0] + means[1]) / 2 - reference)) > 1e-3


# -- random init -----------------------------------------------------------------------------------


def _all_layers(family: str, seed: int = 0) -> tuple[Any, list[Any]]:
    skeleton = make_skeleton(tiny_hf_config(family), seed=seed)
    return skeleton, build_layers(skeleton, 0, len(layer_plan(skeleton)))


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def test_random_init_statistics(family: str) -> None:
    cfg = tiny_hf_config(family)
    init_std = getattr(cfg, "initializer_range", None) or cfg.init_std  # OPT calls it init_std
    skeleton, layers = _all_layers(family)
    checked_random = checked_norms = 0
    for layer in stage_layers(nn.ModuleList(layers)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = float(module.weight.detach().std())
                assert abs(std / init_std - 1) < 0.2, f"{name}: std {std} vs {init_std}"
                assert abs(float(module.weight.detach().mean())) < 0.1 * init_std, name
                checked_random += 1
            elif _is_norm(module):
                # Gemma's RMSNorm scales by (1 + weight): HF starts its weight at zero.
                start = 0.0 if type(module).__name__.startswith("Gemma") else 1.0
                assert torch.equal(module.weight, torch.full_like(module.weight, start)), name
                if getattr(module, "bias", None) is not None:
                    assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
                checked_norms += 1
    assert checked_random >= 2  # at least the embedding and the head (or positions)
    with torch.device("meta"):
        hf_norms = sum(_is_norm(m) for m in reference_class(family).from_config(cfg).modules())
    assert checked_norms == hf_norms >= 2 * cfg.num_hidden_layers + 1


@pytest.mark.parametrize(
    "family",
    [f for f in FAMILIES],
)
def test_random_init_matches_hf_init_per_tensor(family: str) -> None:
    torch.manual_seed(0)
    reference = dict(reference_class(family).from_config(tiny_hf_config(family)).state_dict())
    _, layers = _all_layers(family)
    seen = 0
    for layer in stage_layers(nn.ModuleList(layers)):
        for hf_name, tensor in hf_state_dict(layer).items():
            ref = reference[hf_name]
            assert tensor.shape == ref.shape, hf_name
            if float(ref.std()) == 0.0:
                assert torch.equal(tensor, ref), f"{hf_name}: HF initialises it to the constant {float(ref[0])}"
            else:
                ratio = float(tensor.std()) / float(ref.std())
                assert abs(ratio - 1) < 0.2, f"{hf_name}: std {float(tensor.std()):.4g} vs HF {float(ref.std()):.4g}"
            seen += 1
    # All but the copies of tied tensors (a tied head's weight; BERT's masked-LM head ties its bias too).
    aliases = len(reference) - len({t.data_ptr() for t in reference.values()})
    assert seen >= len(reference) - max(1, aliases)


def test_random_init_is_deterministic_per_layer_index(family: str) -> None:
    rng_before = torch.random.get_rng_state()
    skeleton, layers = _all_layers(family)
    # Building layers leaves the global generator alone.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    _, again = _all_layers(family)
    n = len(layers)
    for a, b in zip(layers, again, strict=True):
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(pa, pb), name

    # A layer's weights do not depend on which other layers are built with it.
    (block_alone,) = build_layers(skeleton, 2, 3)
    for name, tensor in block_alone.state_dict().items():
        assert torch.equal(tensor, layers[2].state_dict()[name]), name
    if family in TIED_FAMILIES:
        (head_alone,) = build_layers(skeleton, n - 1, n)
        for name in tied_names(layers[0], skeleton.config):
            assert torch.equal(head_alone.embed.get_parameter(name), layers[0].get_parameter(name))

    # Different blocks, and a different seed, give different weights.
    first, second = layers[1].state_dict(), layers[2].state_dict()
    random_keys = [k for k, v in first.items() if v.numel() > 1 and float(v.std()) > 0]
    assert random_keys
    for key in random_keys:
        assert not torch.equal(first[key], second[key]), key
    _, other_seed = _all_layers(family, seed=1)
    assert not torch.equal(other_seed[1].state_dict()[random_keys[0]], first[random_keys[0]])
