"""Pipeline layers vs the unmodified Hugging Face model: CPU, fp32, one process.

Every registered family is covered: the whole layer list, every 2- and 3-stage split (each stage
built and loaded on its own, as a rank would), the loss function, and HF-like random init.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAMILIES, TIED_FAMILIES, random_tokens, run_layers, saved_model, tiny_hf_config
from pipefit import adapters
from pipefit.build import build_layers, layer_plan, load_weights, make_skeleton, stage_layers
from pipefit.stages import IGNORE_INDEX, BlockLayer, EmbedLayer, causal_lm_loss
from pipefit.weights import hf_state_dict

TOL = {"atol": 1e-5, "rtol": 1e-5}


def build_loaded(skeleton: Any, folder: Path, start: int, stop: int) -> list[Any]:
    """Layers ``[start, stop)`` built by one ``build_layers`` call and filled from ``folder``, like one rank."""
    layers = build_layers(skeleton, start, stop)
    load_weights(nn.ModuleList(layers), skeleton, folder)
    for layer in layers:
        layer.eval()
    return layers


def hf_logits(model: Any, inputs: tuple[torch.Tensor, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    input_ids, position_ids = inputs
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits


# -- coverage of the registry ---------------------------------------------------------------------


def test_every_registered_config_class_is_tested() -> None:
    tested = {type(tiny_hf_config(f)).__name__ for f in FAMILIES}
    untested = set(adapters.supported_config_classes()) - tested
    assert not untested, f"registered adapter config classes without a parity family in conftest: {sorted(untested)}"
    # Tied and untied heads, and a sliding window, are each exercised at least once.
    assert TIED_FAMILIES & set(FAMILIES) and set(FAMILIES) - TIED_FAMILIES
    assert any(getattr(tiny_hf_config(f), "sliding_window", None) for f in FAMILIES)


def test_unknown_family_error_lists_supported_classes() -> None:
    from transformers import BertConfig

    with pytest.raises(adapters.UnknownFamilyError) as info:
        adapters.for_config(BertConfig())
    message = str(info.value)
    assert "\n" not in message
    assert "BertConfig" in message
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
    assert logits.shape == (2, 20, model.config.vocab_size)
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
                # A stage ending with the final norm hands the head only the normalised hidden states.
                assert isinstance(out, torch.Tensor) and out.shape == (2, 20, model.config.hidden_size)
        torch.testing.assert_close(out, expected, **TOL, msg=lambda m, b=bounds: f"split {b}: {m}")


@pytest.mark.parametrize("family", sorted(TIED_FAMILIES))
def test_tied_head_on_its_own_stage_uses_the_checkpoint_embedding(tmp_path: Path, family: str) -> None:
    folder, model = saved_model(tmp_path, family)
    skeleton = make_skeleton(tiny_hf_config(family))
    n = len(layer_plan(skeleton))
    (head,) = build_loaded(skeleton, folder, n - 1, n)
    # A head-only stage holds just the tied weight (no position embedding, no dropout) ...
    assert isinstance(head.embed, EmbedLayer)
    assert [name for name, _ in head.named_parameters()] == ["embed.embed_tokens.weight"]
    # ... and that weight is the checkpoint's embedding, not the random init.
    torch.testing.assert_close(head.embed.embed_tokens.weight, model.get_input_embeddings().weight, atol=0, rtol=0)


def test_mistral_sliding_window_is_exercised(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, model = saved_model(tmp_path, "mistral")
    cfg = tiny_hf_config("mistral")
    inputs = random_tokens(batch=2, seq=20)
    assert cfg.sliding_window < inputs[0].shape[1]
    skeleton = make_skeleton(cfg)
    blocks = [layer for layer in build_layers(skeleton, 0, len(layer_plan(skeleton))) if isinstance(layer, BlockLayer)]
    assert [b.attention_kind for b in blocks] == ["sliding_attention"] * cfg.num_hidden_layers

    # Without the window the same weights give clearly different logits past the window,
    # so the parity tests above would fail if the pipeline ignored it.
    full = AutoModelForCausalLM.from_pretrained(folder, sliding_window=None).eval()
    windowed = hf_logits(model, inputs)
    unwindowed = hf_logits(full, inputs)
    torch.testing.assert_close(windowed[:, : cfg.sliding_window], unwindowed[:, : cfg.sliding_window], **TOL)
    assert (windowed[:, cfg.sliding_window :] - unwindowed[:, cfg.sliding_window :]).abs().max() > 1e-3


def test_reset_position_ids_isolate_packed_documents(tmp_path: Path, family: str) -> None:
    # Position ids that restart mark packed documents: each stage rebuilds a mask that keeps
    # them apart, as HF does without a KV cache (use_cache=False, the training setting).
    folder, model = saved_model(tmp_path, family)
    skeleton = make_skeleton(tiny_hf_config(family))
    layers = build_loaded(skeleton, folder, 0, len(layer_plan(skeleton)))
    input_ids, _ = random_tokens(batch=2, seq=20)
    position_ids = torch.cat([torch.arange(12), torch.arange(8)]).expand(2, 20).contiguous()

    with torch.no_grad():
        logits = run_layers(layers, (input_ids, position_ids))

    torch.testing.assert_close(logits, hf_logits(model, (input_ids, position_ids), use_cache=False), **TOL)
    second_alone = hf_logits(model, (input_ids[:, 12:], position_ids[:, 12:]))
    torch.testing.assert_close(logits[:, 12:], second_alone, **TOL)


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


def test_random_init_statistics(family: str) -> None:
    cfg = tiny_hf_config(family)
    _, layers = _all_layers(family)
    checked_random = checked_norms = 0
    for layer in stage_layers(nn.ModuleList(layers)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = float(module.weight.detach().std())
                assert abs(std / cfg.initializer_range - 1) < 0.2, f"{name}: std {std} vs {cfg.initializer_range}"
                assert abs(float(module.weight.detach().mean())) < 0.1 * cfg.initializer_range, name
                checked_random += 1
            elif type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
                assert torch.equal(module.weight, torch.ones_like(module.weight)), name
                if getattr(module, "bias", None) is not None:
                    assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
                checked_norms += 1
    assert checked_random >= 2  # at least the embedding and the head (or positions)
    assert checked_norms == 2 * cfg.num_hidden_layers + 1


@pytest.mark.parametrize(
    "family",
    [f for f in FAMILIES],
)
def test_random_init_matches_hf_init_per_tensor(family: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = dict(AutoModelForCausalLM.from_config(tiny_hf_config(family)).state_dict())
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
    assert seen >= len(reference) - 1  # all but an untied copy of a tied head


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
        assert torch.equal(head_alone.embed.embed_tokens.weight, layers[0].embed_tokens.weight)

    # Different blocks, and a different seed, give different weights.
    first, second = layers[1].state_dict(), layers[2].state_dict()
    random_keys = [k for k, v in first.items() if v.numel() > 1 and float(v.std()) > 0]
    assert random_keys
    for key in random_keys:
        assert not torch.equal(first[key], second[key]), key
    _, other_seed = _all_layers(family, seed=1)
    assert not torch.equal(other_seed[1].state_dict()[random_keys[0]], first[random_keys[0]])
