"""BERT as pipeline stages vs the unmodified Hugging Face task models (CPU, fp32).

Masked LM (tied and untied decoder) and sequence classification: every 2- and 3-stage split
equals ``BertForMaskedLM`` / ``BertForSequenceClassification`` on a right-padded batch (HF fed the
attention mask), losses included; documents packed in one row attend only within themselves;
weights load from task, other-task and bare ``BertModel`` checkpoints; exports reload with
``from_pretrained``; masked-LM masks are the same for any data-parallel split. The slow tests train
a masked LM (2 stages) and a sequence classifier (2 stages x 2 data-parallel ranks, ZeRO-1) through
the recipe and compare them with one-process training.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import BERT_ARCHITECTURES, BERT_VOCAB, bert_config, build_loaded
from pipefit.config import ConfigError
from pipefit.data import tasks as data_tasks
from pipefit.data.batches import BatchLayout, GlobalBatches, Rows
from pipefit.model import encoder, weights
from pipefit.model.layer_list import build_layers, check_run, layer_plan, make_skeleton, stage_layers
from pipefit.model.layers import IGNORE_INDEX, causal_lm_loss
from pipefit.parity.reference import DocumentMasked
from pipefit.partition.boundaries import boundaries_for

TOL = {"atol": 1e-5, "rtol": 1e-5}
VOCAB = BERT_VOCAB
SEQ = 16
PAD = 5  # padded positions at the end of the last row
ARCH = BERT_ARCHITECTURES


def saved_bert(tmp_path: Path, case: str, seed: int = 0) -> tuple[Path, Any]:
    """A random HF model for ``case`` saved with ``save_pretrained``; returned in eval mode."""
    from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel

    cls = {"BertForMaskedLM": BertForMaskedLM, "BertForSequenceClassification": BertForSequenceClassification}
    torch.manual_seed(seed)
    model = cls.get(ARCH.get(case, ""), BertModel)(bert_config(case)).eval()
    folder = tmp_path / f"bert-{case}-{seed}"
    model.save_pretrained(folder)
    return folder, model


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, position_ids, attention_mask)``: two rows, the last right-padded over ``PAD`` positions
    whose position ids restart at 0 (pipefit's padding), the pad ids random (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=g)
    pos = torch.arange(SEQ).repeat(2, 1)
    pos[1, SEQ - PAD :] = torch.arange(PAD)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - PAD :] = 0
    return ids, pos, mask


def run(layers: list[Any], x: Any) -> Any:
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
    return x


def stage_splits(n: int) -> list[tuple[int, ...]]:
    return [(0, *cuts, n) for k in (2, 3) for cuts in itertools.combinations(range(1, n), k - 1)]


# -- logits and losses -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlm", "mlm_untied", "cls"])
def test_every_stage_split_matches_hf_on_a_padded_batch(tmp_path: Path, case: str) -> None:
    folder, model = saved_bert(tmp_path, case)
    skeleton = make_skeleton(bert_config(case))
    plan = layer_plan(skeleton)
    kinds = [x.kind for x in plan]
    assert kinds == ["embed", "block", "block", "block", "transform" if case != "cls" else "pooler", "head"]
    assert plan[-1].tied == (case == "mlm")
    ids, pos, mask = padded_batch()
    real = mask.bool()
    g = torch.Generator().manual_seed(5)
    if case == "cls":
        targets = torch.tensor([2, 0])
        n = 2
    else:
        chosen = (torch.rand(2, SEQ, generator=g) < 0.3) & real
        targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        n = int(chosen.sum())
        assert n >= 4
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=targets)

    splits = stage_splits(len(plan))
    assert len(splits) == 5 + 10
    built: dict[tuple[int, int], list[Any]] = {}
    for bounds in splits:
        out: Any = (ids, pos)
        for start, stop in itertools.pairwise(bounds):
            if (start, stop) not in built:
                built[(start, stop)] = build_loaded(skeleton, folder, start, stop)
            out = run(built[(start, stop)], out)
        if case == "cls":
            assert out.shape == (2, 3)
            torch.testing.assert_close(out, ref.logits, **TOL, msg=f"split {bounds}")
        else:
            assert out.shape == (2, SEQ, VOCAB)
            torch.testing.assert_close(out[real], ref.logits[real], **TOL, msg=f"split {bounds}")
        loss = causal_lm_loss(out, (targets, torch.tensor([1.0 / n])))
        torch.testing.assert_close(loss, ref.loss, **TOL, msg=f"split {bounds}")
    # The padding attends only to itself: with HF's positions and mask the real tokens are the same,
    # but the padded row's pad outputs differ (so the comparison above really skipped them).
    if case != "cls":
        assert not torch.allclose(out[~real], ref.logits[~real], atol=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_documents_in_one_row_attend_only_within_themselves(tmp_path: Path, attn: str) -> None:
    from transformers import BertForMaskedLM

    folder, _ = saved_bert(tmp_path, "mlm")
    model = BertForMaskedLM.from_pretrained(folder, attn_implementation=attn).eval()
    skeleton = make_skeleton(bert_config("mlm", attn=attn))
    layers = build_loaded(skeleton, folder, 0, len(layer_plan(skeleton)))
    ids, _, _ = padded_batch(seed=3)
    cut = 7
    packed_pos = torch.cat([torch.arange(cut), torch.arange(SEQ - cut)]).repeat(2, 1)
    packed = run(layers, (ids, packed_pos))
    with torch.no_grad():
        first = model(input_ids=ids[:, :cut]).logits
        second = model(input_ids=ids[:, cut:]).logits
    torch.testing.assert_close(packed[:, :cut], first, **TOL)
    torch.testing.assert_close(packed[:, cut:], second, **TOL)
    # The single-process reference wrapper applies the same mask to the unmodified HF model.
    with torch.no_grad():
        reference = DocumentMasked(model)(input_ids=ids, position_ids=packed_pos, use_cache=False).logits
    torch.testing.assert_close(reference, packed, **TOL)
    # One document over the whole row (positions 0..SEQ-1) is the unmasked HF model, and differs.
    whole = run(layers, (ids, torch.arange(SEQ).repeat(2, 1)))
    with torch.no_grad():
        torch.testing.assert_close(whole, model(input_ids=ids).logits, **TOL)
    assert (whole[:, :cut] - first).abs().max() > 1e-3


def test_document_mask_is_built_once_per_micro_batch_and_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ``.all()`` is a host sync: once per micro-batch and stage, not once per block."""
    from pipefit.model.layers import MaskCache

    calls: list[int] = []
    real = encoder.document_mask
    monkeypatch.setattr(encoder, "document_mask", lambda c, h, p: calls.append(h.shape[0]) or real(c, h, p))
    skeleton = make_skeleton(bert_config("mlm"))
    layers = build_layers(skeleton, 0, len(layer_plan(skeleton)))
    blocks = [x for x in layers if isinstance(x, encoder.EncoderBlockLayer)]
    assert len(blocks) >= 2
    ids, _, _ = padded_batch(seed=3)
    packed_pos = torch.cat([torch.arange(7), torch.arange(SEQ - 7)]).repeat(2, 1)
    cached = run(layers, (ids, packed_pos))
    assert calls == [2]
    for block in blocks:
        block.masks = MaskCache()
    calls.clear()
    assert torch.equal(run(layers, (ids, packed_pos)), cached)
    assert calls == [2] * len(blocks)


def test_masked_lm_head_holds_the_tied_weight_and_bias(tmp_path: Path) -> None:
    folder, model = saved_bert(tmp_path, "mlm")
    skeleton = make_skeleton(bert_config("mlm"))
    n = len(layer_plan(skeleton))
    (head,) = build_loaded(skeleton, folder, n - 1, n)
    # A head-only stage allocates the word embedding and the output bias, nothing else of the embedding.
    assert sorted(name for name, _ in head.named_parameters()) == [
        "embed.embeddings.word_embeddings.weight",
        "embed.predictions.bias",
    ]
    torch.testing.assert_close(head.embed.word_embedding().weight, model.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(head.embed.output_bias(), model.cls.predictions.bias)
    # The embedding stage's copy of the bias gets an exact zero gradient (both tied stages all-reduce it).
    (embed,) = build_layers(skeleton, 0, 1)
    hidden, _ = embed((torch.randint(0, VOCAB, (1, 4)), torch.arange(4)[None]))
    hidden.sum().backward()
    assert embed.output_bias().grad is not None and not embed.output_bias().grad.any()


# -- weights ----------------------------------------------------------------------------------------


def test_classifier_from_a_bare_bert_model_keeps_a_seeded_random_head(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    folder, base = saved_bert(tmp_path, "base")
    cfg = BertConfig.from_pretrained(folder, architectures=["BertForSequenceClassification"], num_labels=3)
    skeleton = make_skeleton(cfg, seed=11)
    n = len(layer_plan(skeleton))
    layers = build_loaded(skeleton, folder, 0, n)
    pooler, head = layers[-2], layers[-1]
    # The base model's tensors (saved without the "bert." prefix) are loaded, the pooler included ...
    torch.testing.assert_close(pooler.pooler.dense.weight, base.pooler.dense.weight, atol=0, rtol=0)
    torch.testing.assert_close(layers[1].block.output.dense.weight, base.encoder.layer[0].output.dense.weight)
    # ... the classifier is HF's init from the run's seed: the same on every build, another with another seed.
    (again,) = build_layers(skeleton, n - 1, n)
    torch.testing.assert_close(head.classifier.weight, again.classifier.weight, atol=0, rtol=0)
    (other,) = build_layers(make_skeleton(cfg, seed=12), n - 1, n)
    assert not torch.equal(head.classifier.weight, other.classifier.weight)
    assert float(head.classifier.weight.detach().std()) == pytest.approx(cfg.initializer_range, rel=0.3)

    reference = BertForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    reference.classifier.load_state_dict(head.classifier.state_dict())
    ids, pos, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(run(layers, (ids, pos)), expected, **TOL)


def test_classifier_from_a_masked_lm_checkpoint_and_missing_encoder_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder, mlm = saved_bert(tmp_path, "mlm")
    cfg = bert_config("cls")
    skeleton = make_skeleton(cfg)
    n = len(layer_plan(skeleton))
    layers = build_loaded(skeleton, folder, 0, n)  # no pooler, no classifier in the folder: both new
    torch.testing.assert_close(layers[0].embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)
    fresh = build_layers(skeleton, n - 2, n)
    torch.testing.assert_close(layers[-2].pooler.dense.weight, fresh[0].pooler.dense.weight, atol=0, rtol=0)

    tensors = load_file(folder / "model.safetensors")
    del tensors["bert.encoder.layer.1.attention.self.query.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(weights.CheckpointError, match=r"lacks 1 tensor\(s\).*layer\.1\.attention\.self\.query"):
        build_loaded(skeleton, folder, 2, 3)


def test_task_and_config_errors_are_one_line() -> None:
    from transformers import BertConfig

    cases = [
        (BertConfig(), r"model\.hf_config\.architectures=\[\] names no task head.*\[BertForMaskedLM\]"),
        (bert_config("base"), r"architectures=\['BertModel'\].*\[BertForSequenceClassification\]"),
        (bert_config("cls", num_labels=1), r"model\.hf_config\.num_labels=1 .*accepted: num_labels >= 2"),
    ]
    for cfg, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as info:
            make_skeleton(cfg)
        assert "\n" not in str(info.value)


def test_flash_attention_is_refused_for_the_encoder() -> None:
    """The encoder's flash path would drop the padding mask: one line, before any rank starts."""
    from pipefit.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    run = RunConfig(
        model=ModelConfig(attn_implementation="flash_attention_2"),
        train=TrainConfig(precision="bf16"),
        data=DataConfig(seq_len=32),
    )
    skeleton = make_skeleton(bert_config("mlm"))
    with pytest.raises(ConfigError) as info:
        check_run(run, skeleton)
    assert str(info.value) == (
        "model.attn_implementation=flash_attention_2 is not accepted for BertConfig: the encoder's flash path "
        "drops its padding mask; use model.attn_implementation=sdpa or eager"
    )
    run.model.attn_implementation = "sdpa"
    check_run(run, skeleton)


@pytest.mark.parametrize("case", ["mlm", "mlm_untied", "cls"])
def test_export_round_trip_through_from_pretrained(tmp_path: Path, case: str) -> None:
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from pipefit.model.encoder import EncoderEmbedLayer

    folder, _ = saved_bert(tmp_path, case)
    cfg = bert_config(case)
    skeleton = make_skeleton(cfg)
    n = len(layer_plan(skeleton))
    stages = [build_loaded(skeleton, folder, 0, 2), build_loaded(skeleton, folder, 2, n)]
    g = torch.Generator().manual_seed(9)
    embed = stages[0][0]
    everything = stage_layers(nn.ModuleList(stages[0] + stages[1]))
    with torch.no_grad():  # nudge every tensor so that a swapped pair could not round-trip
        for layer in everything:
            if not (isinstance(layer, EncoderEmbedLayer) and layer is not embed):
                for p in layer.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for layer in everything:  # a tied head's copy stays equal to the embedding's, as DeepSpeed keeps it
            if isinstance(layer, EncoderEmbedLayer) and layer is not embed:
                layer.word_embedding().weight.copy_(embed.word_embedding().weight)
                layer.output_bias().copy_(embed.output_bias())
    out_dir = tmp_path / "export"
    staging = weights.staging_dir(out_dir, "t")
    staging.mkdir(parents=True)
    shards: dict[str, list[str]] = {}
    for s, layers in enumerate(stages):  # what train.export_pipeline does, in one process
        tensors: dict[str, torch.Tensor] = {}
        for layer in stage_layers(nn.ModuleList(layers)):
            if isinstance(layer, EncoderEmbedLayer) and s != 0:
                continue
            tensors.update(weights.hf_state_dict(layer))
        weights.write_shard(tensors, staging, f"model-{s + 1:05d}-of-00002.safetensors")
        shards[f"model-{s + 1:05d}-of-00002.safetensors"] = sorted(tensors)
    weights.finalize_export(staging, out_dir, shards, skeleton.config, None)
    names = {k for v in shards.values() for k in v}
    assert ("cls.predictions.bias" in names) == (case == "mlm")
    assert ("cls.predictions.decoder.weight" in names) == (case == "mlm_untied")

    auto = AutoModelForSequenceClassification if case == "cls" else AutoModelForMaskedLM
    model = auto.from_pretrained(out_dir).eval()
    assert type(model).__name__ == ARCH[case]
    ids, pos, mask = padded_batch(seed=4)
    pipeline = run(stages[1], run(stages[0], (ids, pos)))
    with torch.no_grad():
        reloaded = model(input_ids=ids, attention_mask=mask).logits
    if case == "cls":
        torch.testing.assert_close(reloaded, pipeline, **TOL)
    else:
        torch.testing.assert_close(reloaded[mask.bool()], pipeline[mask.bool()], **TOL)
    if case == "mlm":
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


# -- partitions -------------------------------------------------------------------------------------


def test_partition_methods_and_cost_models() -> None:
    from pipefit.partition import boundaries, costs

    skeleton = make_skeleton(bert_config("mlm"))
    assert boundaries_for(skeleton, "uniform", 2, None) == [0, 3, 6]
    assert boundaries_for(skeleton, "manual", 3, [0, 1, 5, 6]) == [0, 1, 5, 6]
    by_params = boundaries_for(skeleton, "parameters", 2, None)
    assert by_params[0] == 0 and by_params[-1] == 6 and len(by_params) == 3
    assert boundaries_for(skeleton, "type:BertLayer", 3, None) == [0, 2, 3, 6]
    work = costs.Workload(micro_batch_size=2, seq_len=16)
    priced = boundaries.price_layers(skeleton, "flops", work)
    assert priced.method == "flops" and len(priced.forward_s) == 6
    # The tied decoder over the vocabulary (2 x 32 x 64 x 4160 per forward) outweighs a block at this size.
    assert priced.flops[5].matmul == 2 * 32 * 64 * VOCAB
    assert priced.flops[5].total > priced.flops[1].total > priced.flops[4].total > 0
    # The head alone costs more than everything before it: it gets a stage of its own.
    assert priced.per_layer()[5] > sum(priced.per_layer()[:5])
    assert boundaries_for(skeleton, "flops", 2, None, workload=work) == [0, 5, 6]


def _encoder_forward_backward(module: Any, layer: Any, cfg: Any, batch: int, seq: int) -> None:
    """One forward and backward of a layer with the inputs its stage receives, loss included for the head."""
    h = cfg.hidden_size
    positions = torch.arange(seq).expand(batch, seq)
    if layer.kind == "embed":
        out = module((torch.randint(0, VOCAB, (batch, seq)), positions))[0]
    elif layer.kind == "head" and cfg.architectures == ["BertForSequenceClassification"]:
        logits = module(torch.randn(batch, h, requires_grad=True))
        out = causal_lm_loss(logits, (torch.randint(0, cfg.num_labels, (batch,)), torch.tensor(1.0)))
    elif layer.kind == "head":
        logits = module(torch.randn(batch, seq, h, requires_grad=True))
        out = causal_lm_loss(logits, (torch.randint(0, VOCAB, (batch, seq)), torch.tensor(1.0)))
    else:
        out = module((torch.randn(batch, seq, h, requires_grad=True), positions))
        out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out)) if out.dim() else out.backward()


@pytest.mark.parametrize("case", ["mlm", "mlm_untied", "cls"])
def test_flops_match_flop_counter_on_bert_layers(case: str) -> None:
    """Every BERT layer's analytic FLOPs (bidirectional attention over all s^2 pairs, the masked-LM
    transform and decoder, the pooler and classifier) against ``FlopCounterMode`` on the real layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipefit.partition.costs import layer_flops

    # Wide enough that element-wise work (which the counter ignores) stays under 5 % of every layer.
    cfg = bert_config(case, attn="eager", hidden_size=256, intermediate_size=512)
    skeleton = make_skeleton(cfg)
    plan = layer_plan(skeleton)
    batch, seq = 2, 24
    kinds = []
    for layer in plan:
        module = build_layers(skeleton, layer.index, layer.index + 1)[0]
        with FlopCounterMode(display=False) as counter:
            _encoder_forward_backward(module, layer, cfg, batch, seq)
        measured = counter.get_total_flops()
        ours = layer_flops(cfg, layer, seq, batch)  # no causal=False needed: an encoder attends both ways
        kinds.append(layer.kind)
        if layer.kind == "embed":
            assert measured == 0 and ours.matmul == ours.attention == 0 and ours.total > 0
            continue
        assert 3 * (ours.matmul + ours.attention) == pytest.approx(measured, rel=0.05), (case, layer.kind)
        assert ours.total == pytest.approx(measured, rel=0.05), (case, layer.kind)
    tail = ["transform", "head"] if case.startswith("mlm") else ["pooler", "head"]
    assert kinds == ["embed", "block", "block", "block", *tail]
    t = batch * seq
    block = layer_flops(cfg, plan[1], seq, batch)
    assert block.attention == 2 * 2 * batch * 4 * 64 * seq * seq  # QK^T and PV over all s^2 pairs
    assert block.matmul == 2 * t * 256 * 4 * 256 + 2 * 2 * t * 256 * 512
    if case == "cls":
        assert layer_flops(cfg, plan[4], seq, batch).matmul == 2 * batch * 256 * 256  # pooler: first token
        assert layer_flops(cfg, plan[5], seq, batch).matmul == 2 * batch * 256 * 3  # classifier, 3 labels
    else:
        assert layer_flops(cfg, plan[4], seq, batch).matmul == 2 * t * 256 * 256
        assert layer_flops(cfg, plan[5], seq, batch).matmul == 2 * t * 256 * VOCAB


@pytest.mark.parametrize("case", ["mlm", "cls"])
def test_profile_measures_bert_layers(case: str, tmp_path: Path) -> None:
    from pipefit.partition import boundaries, costs, profile

    skeleton = make_skeleton(bert_config(case))
    plan = layer_plan(skeleton)
    work = costs.Workload(seq_len=16, micro_batch_size=2)
    profiles = profile.profile_layers(skeleton, plan, work, cache_dir=tmp_path, min_runs=2, max_runs=3, warmup=1)
    assert len(profiles) == 6 and all(p.forward_s > 0 and p.backward_s > 0 for p in profiles)
    assert profiles[1] == profiles[2] == profiles[3]  # identical blocks measured once
    # A block saves more than the pooler or transform; the MLM head saves its fp32 logits over the vocabulary.
    assert profiles[1].activation_bytes > profiles[4].activation_bytes > 0
    if case == "mlm":
        assert profiles[5].activation_bytes >= 2 * 16 * VOCAB * 4
    bounds = boundaries_for(
        skeleton, "profile", 2, None, layer_costs=boundaries.price_layers(skeleton, "profile", work, cache_dir=tmp_path)
    )
    assert bounds[0] == 0 and bounds[-1] == 6 and len(bounds) == 3


@pytest.mark.parametrize(("case", "bounds"), [("mlm", [0, 5, 6]), ("cls", [0, 2, 6])])
def test_plan_prices_a_local_encoder_folder(
    case: str, bounds: list[int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipefit.cli import main

    folder, _ = saved_bert(tmp_path, case)
    capsys.readouterr()  # what saving the folder printed
    assert main(["plan", "model=local", f"model.path={folder}", "data.seq_len=32", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["chosen"] == "flops" and report["methods"]["flops"]["boundaries"] == bounds
    best = report["methods"]["flops"]["bottleneck_s"]
    assert all(best <= m["bottleneck_s"] for m in report["methods"].values())
    assert [x["kind"] for x in report["layers"]][-2:] == (
        ["transform", "head"] if case == "mlm" else ["pooler", "head"]
    )
    assert all(x["flops"] > 0 for x in report["layers"])


# -- data ---------------------------------------------------------------------------------------------


def _tokenizer() -> Any:
    from pipefit.model.hf import load_tokenizer, resolve_tokenizer_path

    return load_tokenizer(resolve_tokenizer_path(None, None))


def test_masked_lm_masks_are_the_same_for_any_data_parallel_split() -> None:
    tokenizer = _tokenizer()
    mask_id = data_tasks.ensure_mask_token(tokenizer, bert_config("mlm"))
    assert mask_id == 4096 and len(tokenizer) == 4097
    g = torch.Generator().manual_seed(0)
    n, seq = 64, 32
    ids = torch.randint(2, 4096, (n, seq), generator=g, dtype=torch.int32)
    ids[:, 10] = 0  # EOS between documents: never masked
    pos = torch.arange(seq, dtype=torch.int32).repeat(n, 1)
    pos[:, 28:] = torch.arange(4)  # a padded tail (positions restart)
    ids[:, 28:] = 1  # the pad id: never masked
    rows = Rows(ids, pos, torch.zeros_like(ids), "pad")

    def global_step(dp: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
        layout = BatchLayout(2, 8 // dp, dp)
        batches = data_tasks.MaskedLMBatches(GlobalBatches(rows, layout, seed=3), tokenizer, seed=3)
        parts = [batches.micro_batches(step, r) for r in range(dp)]
        order = [parts[r][j] for j in range(layout.grad_accum_steps) for r in range(dp)]
        cat = [torch.cat([x[0][k] for x in order]) for k in (0, 1)] + [torch.cat([x[1][0] for x in order])]
        return cat[0], cat[1], cat[2], sorted({float(x[1][1]) for x in order})

    masked, positions, targets, scales = global_step(1, 2)
    for dp in (2, 4):
        m, p, t, s = global_step(dp, 2)
        assert torch.equal(m, masked) and torch.equal(p, positions) and torch.equal(t, targets)
        assert s == pytest.approx([dp * (8 // dp) / int((targets != IGNORE_INDEX).sum())])
    chosen = targets != IGNORE_INDEX
    original = torch.where(chosen, targets, masked)
    assert not chosen[:, 10].any() and not chosen[:, 28:].any()
    assert torch.equal(masked[~chosen], original[~chosen])  # only chosen positions change
    eligible = 16 * (seq - 5)
    assert 0.10 < chosen.sum() / eligible < 0.20
    replaced = masked[chosen] == mask_id
    assert 0.65 < replaced.float().mean() < 0.95
    assert not torch.equal(global_step(1, 3)[2], targets)  # another step, other masks


def test_classification_batches_from_jsonl(tmp_path: Path) -> None:
    from pipefit.config import DataConfig

    data = tmp_path / "train.jsonl"
    texts = [f"example number {i} " + "word " * (i % 7) for i in range(12)]
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(texts)))
    cfg = DataConfig(source="json", data_files=[str(data)], seq_len=8)
    tokenizer = _tokenizer()
    layout = BatchLayout(2, 2, 2)
    train, evaluation = data_tasks.build_batches(bert_config("cls"), cfg, tokenizer, layout, seed=0)
    assert evaluation is None
    (ids, pos), (labels, scale) = train.micro_batches(0, 1)[1]
    assert ids.shape == (2, 8) and labels.shape == (2,)
    assert float(scale) == pytest.approx(2 * 2 / 8)  # micro-batches x dp / examples in the global batch
    all_labels = torch.cat([mb[1][0] for r in range(2) for mb in train.micro_batches(0, r)])
    assert set(all_labels.tolist()) <= {0, 1, 2}
    rows = data_tasks.classification_rows(cfg, tokenizer, bert_config("cls"))
    first = tokenizer(texts[0])["input_ids"]
    assert rows.input_ids[0, : len(first)].tolist() == first
    assert rows.position_ids[0].tolist() == list(range(len(first))) + list(range(8 - len(first)))
    assert rows.targets[:, 0].tolist() == [i % 3 for i in range(12)]

    # Through the recipe's config and Prepared (every check before any rank starts).
    from launching import compose
    from pipefit.config import validate
    from pipefit.run.preflight import Prepared

    base = [
        "model=bert_cls_tiny",
        "model.hf_config.num_labels=3",
        "data=json",
        f"data.data_files=[{data}]",
        "data.seq_len=8",
    ]
    prepared = Prepared(validate(compose([*base, "train.micro_batch_size=2", "train.grad_accum_steps=3"])), 2)
    (ids, _), (labels, scale) = prepared.batches.micro_batches(1, 0)[2]
    assert ids.shape == (2, 8) and labels.shape == (2,) and float(scale) == pytest.approx(3 / 6)
    for extra, message in [
        (["data.seq_len=600"], "data.seq_len=600 exceeds the model's 512 learned positions"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            Prepared(validate(compose([*base, *extra])), 2)

    data.write_text(json.dumps({"text": "a", "label": 7}) + "\n")
    with pytest.raises(ConfigError, match=r"data\.label_field='label': row 0 has label 7; accepted: an integer"):
        data_tasks.classification_rows(cfg, tokenizer, bert_config("cls"))
    cfg.label_field = "sentiment"
    with pytest.raises(ConfigError, match=r"data\.label_field='sentiment' is not a column of the data"):
        data_tasks.classification_rows(cfg, tokenizer, bert_config("cls"))


# -- pipefit verify -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,boundaries",
    [("bert_tiny", "[0,2,5,7]"), ("bert_cls_tiny", "[0,5,6,7]")],
    ids=["mlm-boundary-before-transform", "cls-boundaries-before-pooler-and-classifier"],
)
def test_verify_passes_for_bert_presets(model: str, boundaries: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipefit.cli import main as cli_main

    overrides = [
        f"model={model}",
        "pipeline.stages=3",
        "pipeline.partition=manual",
        f"pipeline.boundaries={boundaries}",
    ]
    assert cli_main(["verify", *overrides, "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("stage boundary") == 2
    assert "PASS" in out


# -- training through the recipe ---------------------------------------------------------------------


@pytest.mark.slow
def test_masked_lm_pipeline_training_matches_single_process_and_exports(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM

    from launching import compose, local_run, losses_match, run_recipe, tail, weights_match
    from pipefit.config import validate
    from pipefit.parity.reference import train_reference
    from pipefit.run.export import export
    from pipefit.run.preflight import Prepared

    steps = 4
    folder, initial = saved_bert(tmp_path, "mlm")
    out = tmp_path / "run"
    overrides = local_run(folder, out, steps, f"train.save_every={steps}", warmup=2)
    proc = run_recipe(overrides, num_processes=2)
    assert proc.returncode == 0, tail(proc)

    run_cfg = validate(compose(overrides))
    prepared = Prepared(run_cfg, 2)
    reference = BertForMaskedLM.from_pretrained(folder, attn_implementation="sdpa")
    ref_losses = train_reference(DocumentMasked(reference), run_cfg, prepared.batches, steps)
    rel = losses_match(out, ref_losses, steps)
    print("masked-LM losses, pipeline vs one process, max relative difference:", rel)

    # The exported folder is a BertForMaskedLM with the reference's trained weights.
    exported = BertForMaskedLM.from_pretrained(out / "hf_model").eval()
    weights_match(exported, reference, initial)
    probe = load_file(out / "hf_model" / "pipeline_probe.safetensors")
    with torch.no_grad():
        logits = exported(input_ids=probe["input_ids"], position_ids=probe["position_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], **TOL)

    # `pipefit export` of the step-4 checkpoint writes the same model.
    again = export(out, tmp_path / "exported")
    with torch.no_grad():
        relogits = BertForMaskedLM.from_pretrained(again).eval()(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(relogits, probe["logits"], **TOL)


@pytest.mark.slow
def test_a_minilm_shaped_folder_is_planned_and_trained_with_a_priced_split(tmp_path: Path) -> None:
    """A masked-LM folder of MiniLM-L6's shape (6 blocks, hidden 384, vocab 30522), no partition named:
    the run takes the split ``pipefit plan`` chose as the smallest bottleneck, and says so."""
    import math

    from transformers import BertConfig, BertForMaskedLM

    from launching import compose, local_run, metrics, run_recipe, tail
    from pipefit.config import validate
    from pipefit.partition.plan import make_plan

    shape = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
    torch.manual_seed(0)
    folder = tmp_path / "minilm"
    BertForMaskedLM(BertConfig(vocab_size=30522, architectures=["BertForMaskedLM"], **shape)).save_pretrained(folder)
    out = tmp_path / "run"
    overrides = local_run(folder, out, 2, "train.export=false")
    report = make_plan(validate(compose(overrides)))
    methods = report["methods"]
    # The decoder over 30522 words outweighs the blocks: it gets a stage (almost) to itself.
    assert report["chosen"] == "flops" and methods["flops"]["boundaries"] == [0, 7, 9]
    assert methods["parameters"]["boundaries"] == [0, 4, 9]
    assert all(methods["flops"]["bottleneck_s"] <= m["bottleneck_s"] for m in methods.values())

    proc = run_recipe(overrides, num_processes=2)
    assert proc.returncode == 0, tail(proc)
    part = json.loads((out / "partition.json").read_text())
    assert (part["method"], part["boundaries"]) == ("flops", [0, 7, 9])
    assert sorted(r["layers"] for r in part["ranks"]) == [[0, 7], [7, 9]]
    assert "partition=flops: boundaries [0, 7, 9]" in proc.stdout + proc.stderr
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 2 and all(abs(x - math.log(30522)) < 1.0 for x in losses)  # random init: ~ln(vocab)


# Three topics, one label each; texts of 4 to 35 tokens, so rows of 16 are padded or truncated.
TOPICS = [
    "the cat sat on the warm mat and purred",
    "stock prices fell sharply as markets closed lower today",
    "rain and strong wind are expected over the northern hills",
]


def classification_jsonl(path: Path, n: int = 48) -> list[dict[str, Any]]:
    """``n`` distinct short texts (lengths vary row to row), labelled by topic 0..2, written as JSON Lines."""
    examples = []
    for i in range(n):
        label = i % 3
        words = TOPICS[label].split()
        text = f"item {i}: " + " ".join(words[: 1 + (i * 5) % len(words)]) + " again" * (i % 11 if i % 4 == 3 else 0)
        examples.append({"text": text, "label": label})
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return examples


class _AttentionMasked(nn.Module):
    """The HF classifier fed HF's own padding mask (``input_ids != pad``) and default positions:
    nothing of pipefit's position-id padding scheme reaches the reference."""

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, position_ids: Any = None, use_cache: bool = False) -> Any:
        return self.model(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long())


@pytest.mark.slow
def test_classification_pipeline_training_matches_single_process_and_exports(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from launching import compose, losses_match, run_recipe, tail
    from pipefit.config import validate
    from pipefit.parity.reference import train_reference
    from pipefit.run.preflight import Prepared

    steps, seq, ranks = 4, 16, 4
    folder, initial = saved_bert(tmp_path, "cls")
    data = tmp_path / "train.jsonl"
    examples = classification_jsonl(data)
    out = tmp_path / "run"
    overrides = [
        "model=local",
        f"model.path={folder}",
        "data=json",
        f"data.data_files=[{data}]",
        f"data.seq_len={seq}",
        f"train.max_steps={steps}",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "zero.stage=1",
        "pipeline.stages=2",
        "optim.warmup_steps=2",
        f"output_dir={out}",
    ]
    proc = run_recipe(overrides, num_processes=ranks)
    assert proc.returncode == 0, tail(proc)

    # The reference's batches come from HF's tokenizer (padding="max_length" + attention mask) and the
    # JSONL's labels; only the order of examples is read from pipefit's batches (matched by content).
    run_cfg = validate(compose(overrides))
    prepared = Prepared(run_cfg, ranks)
    lay = prepared.batches.layout
    assert (lay.dp, lay.grad_accum_steps) == (2, 2)
    tokenizer = _tokenizer()
    hf = tokenizer(
        [e["text"] for e in examples], truncation=True, max_length=seq, padding="max_length", return_tensors="pt"
    )
    pad_id = int(tokenizer.pad_token_id)
    assert torch.equal(hf["attention_mask"].bool(), hf["input_ids"] != pad_id)
    lengths = hf["attention_mask"].sum(1)
    assert int(lengths.min()) <= 5 and int(lengths.max()) == seq and (lengths < seq).sum() >= 30
    index = {tuple(row.tolist()): i for i, row in enumerate(hf["input_ids"])}
    assert len(index) == len(examples)
    labels = torch.tensor([e["label"] for e in examples])

    class HFBatches:
        layout = lay

        @staticmethod
        def micro_batches(step: int, dp_rank: int) -> list[Any]:
            # scale: the mean over the global batch's examples, times the grad_accum x dp DeepSpeed divides by.
            scale = torch.tensor([1.0 / lay.micro_batch_size])
            batches = []
            for (ids, _), _ in prepared.batches.micro_batches(step, dp_rank):
                rows = [index[tuple(r.tolist())] for r in ids]
                batches.append(((hf["input_ids"][rows], None), (labels[rows], scale)))
            return batches

    reference = BertForSequenceClassification.from_pretrained(folder, attn_implementation="sdpa")
    ref_losses = train_reference(_AttentionMasked(reference, pad_id), run_cfg, HFBatches(), steps)
    rel = losses_match(out, ref_losses, steps)
    print("classification losses, pipeline vs one process, max relative difference:", rel)

    exported = AutoModelForSequenceClassification.from_pretrained(out / "hf_model").eval()
    assert type(exported).__name__ == "BertForSequenceClassification"
    ref_sd, exp_sd, init_sd = reference.state_dict(), exported.state_dict(), initial.state_dict()
    assert set(ref_sd) == set(exp_sd)
    assert max(float((ref_sd[k] - init_sd[k]).abs().max()) for k in ref_sd) > 1e-3
    weight_diff = {k: float((exp_sd[k] - ref_sd[k]).abs().max()) for k in ref_sd}
    assert max(weight_diff.values()) <= 2e-5, max(weight_diff.items(), key=lambda kv: kv[1])
    print("classification weights, exported vs one process, max absolute difference:", max(weight_diff.values()))
    # The pipeline's own logits on its first micro-batch (padded rows) are HF's with HF's attention mask.
    probe = load_file(out / "hf_model" / "pipeline_probe.safetensors")
    with torch.no_grad():
        logits = _AttentionMasked(exported, pad_id)(probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], **TOL)
