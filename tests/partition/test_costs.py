"""pipefit.partition.costs: analytic FLOPs against FlopCounterMode, profiling, and the cost-based partitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from conftest import BERT_FAMILIES, FAMILIES, SLIDING_WINDOW, bert_config, task_of_family, tiny_hf_config
from pipefit.model.hf import load_hf_config
from pipefit.model.layer_list import build_layers, layer_plan, make_skeleton
from pipefit.model.layers import causal_lm_loss
from pipefit.model.tasks import SEQUENCE_CLASSIFICATION
from pipefit.partition import boundaries, costs, profile
from pipefit.partition.balance import PartitionError, partition_balanced, partition_uniform, stage_costs
from pipefit.partition.boundaries import boundaries_for
from pipefit.partition.costs import Hardware, Workload, attention_pairs, layer_flops

CONF = Path(__file__).resolve().parents[2] / "conf"
LLAMA_32_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


def _forward_backward(
    module, layer, batch: int, seq: int, hidden_size: int, head_width: int, task: str = "causal_lm"
) -> torch.Tensor:
    positions = torch.arange(seq).expand(batch, seq)
    hidden = torch.randn(batch, seq, head_width if layer.kind == "head" else hidden_size, requires_grad=True)
    if layer.kind == "embed":
        out = module((torch.randint(0, 100, (batch, seq)), positions))[0]
    elif layer.kind == "head" and task == SEQUENCE_CLASSIFICATION:
        # The classifier reads the pooled first token of each row and scores the labels.
        out = causal_lm_loss(module(hidden[:, 0]), (torch.randint(0, 2, (batch,)), torch.tensor(1.0)))
    elif layer.kind == "head":
        out = causal_lm_loss(module(hidden), (torch.randint(0, 100, (batch, seq)), torch.tensor(1.0)))
    else:
        out = module((hidden, positions))
        out = out[0] if isinstance(out, tuple) else out
    if out.dim():
        out.backward(torch.ones_like(out))
    else:
        out.backward()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_match_flop_counter_on_real_layers(family: str) -> None:
    # Eager attention: FlopCounterMode counts its matmuls (it does not count CPU flash attention),
    # over every query-key pair, so the analytic model is asked for causal=False.
    cfg = tiny_hf_config(family)
    if family in BERT_FAMILIES:
        # Wider, so that the element-wise work of the masked-LM transform and the pooler (GELU,
        # LayerNorm, tanh: the counter ignores it) stays under 5 % of their matmuls.
        cfg = bert_config(BERT_FAMILIES[family], hidden_size=4 * cfg.hidden_size, intermediate_size=8 * cfg.hidden_size)
    cfg._attn_implementation = "eager"
    task = task_of_family(family).name
    skeleton = make_skeleton(cfg)
    plan = layer_plan(skeleton)
    batch, seq = 2, 24
    head_width = getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size  # OPT's head sits after project_out
    checked = 0
    for layer in plan:
        module = build_layers(skeleton, layer.index, layer.index + 1)[0]
        with FlopCounterMode(display=False) as counter:
            _forward_backward(module, layer, batch, seq, cfg.hidden_size, head_width, task)
        measured = counter.get_total_flops()
        ours = layer_flops(cfg, layer, seq, batch, causal=False)
        if layer.kind in ("embed", "norm") and family != "opt":
            # Lookups and norms: no matmul (OPT's embedding and final norm layers hold projections).
            assert measured == 0 and ours.matmul == ours.attention == 0
            continue
        assert measured > 0, (family, layer.kind)
        # Matmul and attention work: the counter's own kind of FLOPs, to 5 %.
        assert 3 * (ours.matmul + ours.attention) == pytest.approx(measured, rel=0.05), (family, layer.kind)
        # The total (with element-wise work the counter ignores) stays within 5 % as well.
        assert ours.total == pytest.approx(measured, rel=0.05), (family, layer.kind)
        checked += 1
    # Every layer but the lookups and norms (BERT has no final-norm layer: it normalises after each block).
    assert checked == len(plan) - (0 if family == "opt" else sum(x.kind in ("embed", "norm") for x in plan))
    if family not in BERT_FAMILIES:
        assert checked == len(plan) - (0 if family == "opt" else 2)


def test_gqa_gated_and_plain_mlp_counts_by_hand() -> None:
    llama = tiny_hf_config("llama")  # hidden 64, 4 heads of 16, 2 kv heads, intermediate 128
    block = layer_plan(make_skeleton(llama))[1]
    f = layer_flops(llama, block, seq_len=10, micro_batch_size=1, causal=False)
    t = 10
    assert f.matmul == 2 * t * 64 * (64 + 2 * 32) + 2 * t * 64 * 64 + 3 * 2 * t * 64 * 128
    assert f.attention == 2 * 2 * 4 * 16 * 10 * 10
    gpt2 = tiny_hf_config("gpt2")  # plain MLP (up, down) with n_inner 128, fused qkv
    g = layer_flops(gpt2, layer_plan(make_skeleton(gpt2))[1], seq_len=10, micro_batch_size=1, causal=False)
    assert g.matmul == 2 * t * 64 * 3 * 64 + 2 * t * 64 * 64 + 2 * 2 * t * 64 * 128


def test_new_family_shapes_by_hand() -> None:
    t = 10
    # OPT: embeddings at word_embed_proj_dim (64) projected to hidden (128) and back; the head at 64.
    opt = tiny_hf_config("opt")
    embed, block, norm, head = (layer_plan(make_skeleton(opt))[i] for i in (0, 1, -2, -1))
    f = layer_flops(opt, embed, seq_len=t, micro_batch_size=1)
    assert f.matmul == 2 * t * 64 * 128 and f.elementwise == t * 128  # project_in; learned positions added
    assert f.backward == 2 * f.matmul + t * 64 + t * 128  # its gradient; scatter-adds into both tables
    n = layer_flops(opt, norm, seq_len=t, micro_batch_size=1)
    assert n.matmul == 2 * t * 128 * 64 and n.elementwise == costs.NORM_FLOPS_PER_ELEMENT * t * 128
    assert layer_flops(opt, head, seq_len=t, micro_batch_size=1).matmul == 2 * t * 64 * 4096
    b = layer_flops(opt, block, seq_len=t, micro_batch_size=1, causal=False)
    assert b.matmul == 2 * t * 128 * 3 * 128 + 2 * t * 128 * 128 + 2 * 2 * t * 128 * 256  # plain fc1/fc2
    # Gemma-2: 4 heads of 16 (q 64, kv 32) on a hidden size of 128, GeGLU, four norms, soft-caps.
    gemma2 = tiny_hf_config("gemma2")
    plan = layer_plan(make_skeleton(gemma2))
    g = layer_flops(gemma2, plan[1], seq_len=t, micro_batch_size=1, causal=False)
    assert g.matmul == 2 * t * 128 * (64 + 2 * 32) + 2 * t * 64 * 128 + 3 * 2 * t * 128 * 256
    assert g.attention == 2 * 2 * 4 * 16 * t * t
    shape = costs.ModelShape.from_config(gemma2)
    assert (shape.norms_per_block, shape.attn_softcap, shape.final_softcap, shape.gated) == (4, True, True, True)
    capped = layer_flops(gemma2, plan[-1], seq_len=t, micro_batch_size=1).elementwise
    assert capped == (costs.CROSS_ENTROPY_FLOPS_PER_LOGIT + costs.SOFTCAP_FLOPS_PER_ELEMENT) * t * 4096
    # Partial rotary (Phi-3, GPT-NeoX: half of each head) and QK-norm (Qwen3) are element-wise work.
    for family in ("phi3", "gpt_neox"):
        assert costs.ModelShape.from_config(tiny_hf_config(family)).rotary_fraction == 0.5
    qwen3, llama = (
        costs.ModelShape.from_config(tiny_hf_config("qwen3")),
        costs.ModelShape.from_config(tiny_hf_config("llama")),
    )
    assert qwen3.qk_norm and not llama.qk_norm and llama.rotary_fraction == 1.0
    assert not costs.ModelShape.from_config(tiny_hf_config("gpt_neox")).gated


def test_causal_masking_halves_attention_and_windows_cut_it() -> None:
    assert attention_pairs(100, causal=False) == 10000
    assert attention_pairs(100) == 5050
    assert attention_pairs(100, window=8) == 36 + 92 * 8
    assert attention_pairs(5, window=8) == 15
    mistral = tiny_hf_config("mistral")  # sliding window 8
    block = layer_plan(make_skeleton(mistral))[1]
    full = layer_flops(mistral, block, 64, 1, causal=False).attention
    assert layer_flops(mistral, block, 64, 1).attention == pytest.approx(full * (36 + 56 * 8) / 4096)
    llama = tiny_hf_config("llama")
    block = layer_plan(make_skeleton(llama))[1]
    assert layer_flops(llama, block, 64, 1).attention == pytest.approx(
        layer_flops(llama, block, 64, 1, causal=False).attention * 65 / 128
    )


def test_head_dominates_and_embedding_is_free_for_a_large_vocab() -> None:
    cfg = load_hf_config(None, LLAMA_32_1B)
    plan = layer_plan(make_skeleton(cfg))
    f = costs.model_flops(cfg, plan, 4096, 1)
    assert f[0].forward == 0 and f[0].backward < 1e-4 * f[1].total
    # LM head: 2 * 2048 * 128256 per token, vs a block's ~2*(2048*(2048+1024) + 2048*2048 + 3*2048*8192) + attention.
    assert 3.0 < f[-1].total / f[1].total < 4.0
    assert plan[0].num_params == plan[-1].num_params  # tied: same parameters, opposite costs


@pytest.mark.parametrize(
    ("stages", "ours_max", "params_min", "uniform_min"), [(2, 1.02, 1.05, 1.05), (4, 1.03, 1.15, 1.15)]
)
def test_flops_partition_beats_parameters_and_uniform(stages, ours_max, params_min, uniform_min) -> None:
    cfg = load_hf_config(None, LLAMA_32_1B)
    skeleton = make_skeleton(cfg)
    plan = layer_plan(skeleton)
    work = Workload(seq_len=4096, micro_batch_size=1, micro_batches=8, precision="bf16")
    h100 = Hardware(**yaml.safe_load((CONF / "hardware" / "h100.yaml").read_text()))
    priced = costs.flops_costs(cfg, plan, work, h100)

    def ratio(bounds: list[int]) -> float:
        c = stage_costs(priced.per_layer(), bounds, priced.boundary_costs())
        return max(c) * stages / sum(c)

    ours = boundaries_for(skeleton, "flops", stages, None, layer_costs=priced)
    assert ratio(ours) <= ours_max
    assert ratio(partition_balanced([x.num_params for x in plan], stages)) >= params_min
    assert ratio(partition_uniform(len(plan), stages)) >= uniform_min


def test_boundaries_for_flops_on_the_tiny_llama_and_memory_cap() -> None:
    cfg = load_hf_config(None, {**LLAMA_32_1B, "num_hidden_layers": 4, "tie_word_embeddings": False})
    skeleton = make_skeleton(cfg)
    work = Workload(seq_len=512, micro_batch_size=1, micro_batches=4)
    # Head ~3.5 blocks of compute, embedding ~0: unconstrained, flops gives the head a stage of its own.
    assert boundaries_for(skeleton, "flops", 2, None, workload=work, hardware=Hardware(memory_gib=100)) == [0, 6, 7]
    # fp32 ZeRO-1 at dp=1 keeps 24 B/parameter (Workload.state_bytes_per_param): the embedding's 263M
    # parameters and four blocks (61M each) no longer fit 11 GiB, so the memory cap moves blocks over.
    assert boundaries_for(skeleton, "flops", 2, None, workload=work, hardware=Hardware(memory_gib=11.0)) == [0, 4, 7]
    assert boundaries_for(skeleton, "parameters", 2, None) == [0, 3, 7]
    with pytest.raises(PartitionError, match=r"smallest per-stage cap that would fit is [0-9.e+]+ \([0-9.]+ GiB"):
        boundaries_for(skeleton, "flops", 2, None, workload=work, hardware=Hardware(memory_gib=0.5))
    with pytest.raises(PartitionError, match=r"pipeline\.partition=flops needs the micro-batch shape"):
        boundaries_for(skeleton, "flops", 2, None)


def test_memory_model_counts_state_and_in_flight_activations() -> None:
    cfg = tiny_hf_config("llama")
    plan = layer_plan(make_skeleton(cfg))
    work = Workload(seq_len=16, micro_batch_size=2, micro_batches=3, dp=2, zero_stage=1)
    priced = costs.flops_costs(cfg, plan, work, Hardware())
    assert work.state_bytes_per_param() == 4 + 4 + 20 / 2  # gradient copies, master copy, moments sharded
    assert priced.memory.static[1] == plan[1].num_params * 18
    # Stage 0 of 3 holds min(3, 3) micro-batches of activations, stage 2 holds one.
    assert priced.memory.in_flight(0, 3) == 3 and priced.memory.in_flight(2, 3) == 1
    act = priced.memory.activation[1]
    # dp=2: the stage also fills its part of the 50M-element reduction bucket, 4 bytes per parameter.
    assert priced.memory.stage_bytes(0, 3, 1, 2) == plan[1].num_params * (18 + 4) + 3 * act


@pytest.mark.parametrize(
    ("family", "attn", "layout", "seq", "expected"),
    [
        ("llama", "sdpa", "concat", 16, None),  # causal kernel, no mask
        ("llama", "sdpa", "pack", 16, ("full_attention", 2 * 16 * 16)),  # bool
        ("llama", "sdpa", "pad", 16, ("full_attention", 2 * 16 * 16)),
        ("llama", "eager", "concat", 16, ("full_attention", 2 * 16 * 16 * 4)),  # additive fp32
        ("mistral", "sdpa", "concat", SLIDING_WINDOW - 1, None),  # the window covers the row
        ("mistral", "sdpa", "concat", SLIDING_WINDOW, ("sliding_attention", 2 * 8 * 8)),
        ("opt", "sdpa", "pad", 16, None),  # OPT's mask ignores the position ids
    ],
)
def test_attention_mask_bytes_are_those_of_the_mask_hf_builds(
    family: str, attn: str, layout: str, seq: int, expected: tuple[str, int] | None
) -> None:
    cfg = tiny_hf_config(family)
    cfg._attn_implementation = attn
    skeleton = make_skeleton(cfg)
    block = layer_plan(skeleton)[1]
    assert block.kind == "block"
    predicted = costs.attention_mask(cfg, block, Workload(seq_len=seq, micro_batch_size=2, layout=layout))
    assert predicted == expected
    (layer,) = build_layers(skeleton, 1, 2)
    half = seq // 2
    positions = torch.arange(seq) if layout == "concat" else torch.cat([torch.arange(half), torch.arange(seq - half)])
    mask = layer._mask(torch.zeros(2, seq, int(cfg.hidden_size)), positions.expand(2, seq).contiguous())
    assert (0 if mask is None else mask.numel() * mask.element_size()) == (0 if expected is None else expected[1])


@pytest.mark.parametrize(
    ("precision", "zero_stage", "dp", "expected"),
    [
        ("fp32", 0, 1, 16.0),  # weight, grad, two moments (torch AdamW)
        ("fp32", 0, 4, 16.0),  # ZeRO-0 shards nothing
        ("fp32", 1, 1, 24.0),  # dp=1 (pipefit.run.zero_dp1): flattened gradients, moments, AdamW's temporary
        ("fp32", 1, 4, 13.0),
        ("fp16", 0, 4, 20.0),  # FP16_Optimizer: unsharded fp32 master, flat fp32 gradient, moments
        ("fp16", 1, 4, 8.0),
        ("bf16", 1, 1, 20.0),  # BF16_Optimizer: full fp32 gradient buffer + sharded masters and moments
        ("bf16", 1, 4, 11.0),
        ("bf16", 0, 4, 9.0),  # ZeRO-0: the buffer accumulates in bf16; masters still sharded
    ],
)
def test_state_bytes_per_param(precision: str, zero_stage: int, dp: int, expected: float) -> None:
    """What DeepSpeed 0.19's optimizer wrappers hold per parameter, per precision, stage and dp."""
    work = Workload(seq_len=8, micro_batch_size=1, dp=dp, precision=precision, zero_stage=zero_stage)
    assert work.state_bytes_per_param() == expected


def _count_measurements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = profile.measure_layer

    def counting(skeleton, layer, workload, device="cpu", **kw):
        calls.append(layer.kind)
        return real(skeleton, layer, workload, device, min_runs=2, max_runs=3, warmup=1)

    monkeypatch.setattr(profile, "measure_layer", counting)
    return calls


def test_profile_measures_each_distinct_layer_once_and_caches(tmp_path: Path, monkeypatch) -> None:
    calls = _count_measurements(monkeypatch)
    cfg = tiny_hf_config("llama")  # 3 identical blocks
    skeleton = make_skeleton(cfg)
    plan = layer_plan(skeleton)
    work = Workload(seq_len=16, micro_batch_size=2, micro_batches=2)
    first = profile.profile_layers(skeleton, plan, work, cache_dir=tmp_path)
    assert calls == ["embed", "block", "norm", "head"]
    assert len(first) == len(plan) == 6
    assert first[1] == first[2] == first[3]
    assert all(p.forward_s > 0 and p.backward_s > 0 for p in first)
    # Saved activations: a block saves far more than the norm; the head saves the fp32 log-softmax.
    assert first[1].activation_bytes > 5 * first[4].activation_bytes
    assert first[5].activation_bytes >= 2 * 16 * 4096 * 4
    cache = json.loads((tmp_path / "profile.json").read_text())
    assert len(cache) == 4
    # Same shape: read from the cache, nothing measured.
    assert profile.profile_layers(skeleton, plan, work, cache_dir=tmp_path) == first
    assert len(calls) == 4
    # Another micro-batch shape is another key.
    profile.profile_layers(skeleton, plan, Workload(seq_len=8, micro_batch_size=2), cache_dir=tmp_path)
    assert len(calls) == 8 and len(json.loads((tmp_path / "profile.json").read_text())) == 8


def test_profile_broadcast_gives_rank_zeros_figures(tmp_path: Path, monkeypatch) -> None:
    calls = _count_measurements(monkeypatch)
    cfg = tiny_hf_config("gpt2")
    skeleton = make_skeleton(cfg)
    plan = layer_plan(skeleton)
    work = Workload(seq_len=8, micro_batch_size=1)
    sent: list = []

    def broadcast_from_rank0(obj):
        if obj is not None:
            sent.append(obj)
        return sent[0]

    rank0 = profile.profile_layers(
        skeleton, plan, work, cache_dir=tmp_path, measure=True, broadcast=broadcast_from_rank0
    )
    measured = len(calls)
    rank1 = profile.profile_layers(
        skeleton, plan, work, cache_dir=tmp_path / "r1", measure=False, broadcast=broadcast_from_rank0
    )
    assert rank1 == rank0 and len(calls) == measured == 4
    assert not (tmp_path / "r1").exists()
    with pytest.raises(ValueError, match=r"measure=False\) needs a broadcast"):
        profile.profile_layers(skeleton, plan, work, measure=False)


def test_profile_measures_opt_whose_head_reads_the_projected_width(tmp_path: Path, monkeypatch) -> None:
    calls = _count_measurements(monkeypatch)
    cfg = tiny_hf_config("opt")  # the head reads word_embed_proj_dim (64), the blocks hidden_size (128)
    skeleton = make_skeleton(cfg)
    plan = layer_plan(skeleton)
    profiles = profile.profile_layers(skeleton, plan, Workload(seq_len=8, micro_batch_size=1), cache_dir=tmp_path)
    assert calls == ["embed", "block", "norm", "head"]
    assert all(p.forward_s > 0 and p.backward_s > 0 for p in profiles)


def test_profile_partition_through_boundaries_for(tmp_path: Path, monkeypatch) -> None:
    _count_measurements(monkeypatch)
    cfg = tiny_hf_config("llama")
    skeleton = make_skeleton(cfg)
    work = Workload(seq_len=16, micro_batch_size=2, micro_batches=2)
    priced = boundaries.price_layers(skeleton, "profile", work, cache_dir=tmp_path)
    assert priced.method == "profile"
    bounds = boundaries_for(skeleton, "profile", 2, None, layer_costs=priced)
    assert len(bounds) == 3 and bounds[0] == 0 and bounds[-1] == 6 and 0 < bounds[1] < 6
    stages = stage_costs(priced.per_layer(), bounds, priced.boundary_costs())
    for b in range(1, 6):
        assert max(stages) <= max(stage_costs(priced.per_layer(), [0, b, 6], priced.boundary_costs()))
