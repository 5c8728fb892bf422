"""Stage partitioning (pipefit.partition.balance) against DeepSpeed's own PipelineModule partitioner."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import PipelineModule

from conftest import HIDDEN, VOCAB_SIZE, tiny_hf_config
from pipefit.model.layer_list import build_layers, layer_plan, layer_specs, make_skeleton
from pipefit.partition.balance import PartitionError, partition_balanced, partition_uniform, resolve_partition
from pipefit.partition.boundaries import boundaries_for

# Seven layers as layer_plan lays out a 4-block untied Llama: the names each layer answers to for type:REGEX.
LLAMA_NAMES = [
    ("EmbedLayer", "Embedding"),
    *[("BlockLayer", "LlamaDecoderLayer")] * 4,
    ("NormLayer", "LlamaRMSNorm"),
    ("HeadLayer", "Linear"),
]
ONES = [1] * len(LLAMA_NAMES)


def resolve(
    method: str, stages: int, boundaries: list[int] | None = None, counts: list[int] | None = None
) -> list[int]:
    return resolve_partition(method, stages, counts or ONES, LLAMA_NAMES, boundaries)


# --- the two algorithms, case by case against DeepSpeed ----------------------------------------


def test_partition_uniform_matches_deepspeed() -> None:
    rng = random.Random(20240601)
    cases = [(n, m) for n in range(0, 13) for m in range(1, 15)]
    cases += [(rng.randint(13, 500), rng.randint(1, 40)) for _ in range(200)]
    for n, m in cases:
        ours = partition_uniform(n, m)
        theirs = [int(x) for x in ds_utils.partition_uniform(num_items=n, num_parts=m)]
        assert ours == theirs, (n, m)
        assert len(ours) == m + 1 and ours[0] == 0 and ours[-1] == n


def test_partition_balanced_matches_deepspeed() -> None:
    rng = random.Random(7)
    checked = 0
    for case in range(400):
        n = rng.randint(1, 12)
        m = rng.randint(1, n)
        if case % 4 == 0:
            # Few distinct values: many ties, so the tie-breaking must agree too.
            weights = [rng.choice([0, 0, 1, 2]) for _ in range(n)]
        elif case % 4 == 1:
            weights = [rng.choice([0, rng.randint(1, 10**9)]) for _ in range(n)]
        else:
            weights = [rng.randint(0, 100) for _ in range(n)]
        ours = partition_balanced(weights, m)
        theirs = [int(x) for x in ds_utils.partition_balanced(weights=weights, num_parts=m)]
        assert ours == theirs, (weights, m)
        checked += 1
    assert checked == 400


def test_partition_balanced_known_answers() -> None:
    assert partition_balanced([10, 1, 1, 1, 1, 10], 2) == [0, 3, 6]
    assert partition_balanced([4, 4, 4, 4, 4, 4], 3) == [0, 2, 4, 6]
    # A heavy first layer gets a stage to itself.
    assert partition_balanced([100, 1, 1, 1, 1], 2) == [0, 1, 5]
    # Fewer layers than parts: DeepSpeed's uniform fallback (trailing empty parts).
    assert partition_balanced([5, 5], 3) == [0, 1, 2, 2]


# --- resolve_partition: the four methods --------------------------------------------------------


def test_uniform_boundaries() -> None:
    assert resolve("uniform", 1) == [0, 7]
    assert resolve("uniform", 2) == [0, 4, 7]
    assert resolve("uniform", 3) == [0, 3, 5, 7]
    assert resolve("uniform", 7) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_parameters_boundaries_follow_counts() -> None:
    # Big embedding and head, light blocks: both ends get fewer layers than uniform would give.
    counts = [40, 10, 10, 10, 10, 1, 40]
    assert resolve("parameters", 2, counts=counts) == [0, 3, 7]
    assert resolve("parameters", 3, counts=counts) == [0, 1, 6, 7]
    # Equal counts: the same answer as uniform.
    assert resolve("parameters", 2, counts=[5] * 7) == [0, 4, 7]


def test_type_regex_balances_the_matching_layers() -> None:
    # Four blocks (layers 1..4) split two and two; the non-matching layers weigh nothing.
    assert resolve("type:BlockLayer", 2) == [0, 3, 7]
    assert resolve("type:BlockLayer", 4) == [0, 2, 3, 4, 7]
    # Any layer name may match (here the HF class name, the second name), case-insensitively.
    assert resolve("type:decoderlayer", 2) == [0, 3, 7]
    assert resolve("TYPE:BLOCKLAYER", 2) == [0, 3, 7]
    # A regex: embedding and head count, blocks do not.
    assert resolve("type:^(Embedding|Linear)$", 2) == [0, 6, 7]


def test_manual_boundaries_are_returned_as_given() -> None:
    assert resolve("manual", 2, [0, 4, 7]) == [0, 4, 7]
    assert resolve("manual", 3, [0, 1, 6, 7]) == [0, 1, 6, 7]
    assert resolve("manual", 1, [0, 7]) == [0, 7]


# --- resolve_partition: errors that name the field and the value --------------------------------


def test_partition_error_is_a_value_error() -> None:
    assert issubclass(PartitionError, ValueError)


@pytest.mark.parametrize(
    ("method", "stages", "boundaries", "match"),
    [
        ("uniform", 8, None, r"pipeline\.stages=8 exceeds the 7 pipeline layers.*at most 7 stages"),
        ("parameters", 0, None, r"pipeline\.stages=0 must be at least 1"),
        ("manual", 2, None, r"pipeline\.partition=manual needs pipeline\.boundaries: 3 strictly increasing .* 0 to 7"),
        ("manual", 2, [0, 7], r"pipeline\.boundaries=\[0, 7\] has 2 entries for pipeline\.stages=2"),
        ("manual", 2, [0, 2, 5, 7], r"pipeline\.boundaries=\[0, 2, 5, 7\] has 4 entries for pipeline\.stages=2"),
        ("manual", 3, [0, 5, 3, 7], r"pipeline\.boundaries=\[0, 5, 3, 7\] gives stage 1 no layers \(or is unsorted\)"),
        ("manual", 3, [0, 3, 3, 7], r"pipeline\.boundaries=\[0, 3, 3, 7\] gives stage 1 no layers"),
        ("manual", 2, [1, 4, 7], r"pipeline\.boundaries=\[1, 4, 7\] must start at 0 and end at 7"),
        ("manual", 2, [0, 4, 6], r"pipeline\.boundaries=\[0, 4, 6\] must start at 0 and end at 7"),
        ("manual", 2, [0, 4, 8], r"pipeline\.boundaries=\[0, 4, 8\] must start at 0 and end at 7"),
        (
            "uniform",
            2,
            [0, 4, 7],
            r"pipeline\.boundaries=\[0, 4, 7\] is only used with pipeline\.partition=manual, "
            r"not pipeline\.partition=uniform",
        ),
        ("type:BlockLayer", 2, [0, 4, 7], r"not pipeline\.partition=type:BlockLayer"),
        (
            "balanced",
            2,
            None,
            r"pipeline\.partition='balanced' is not a partition method; "
            r"accepted: uniform, parameters, flops, profile, type:REGEX, manual",
        ),
        (
            "type:Mamba",
            2,
            None,
            r"pipeline\.partition=type:Mamba matches no layer; layer types: BlockLayer, EmbedLayer, Embedding, "
            r"HeadLayer, Linear, LlamaDecoderLayer, LlamaRMSNorm, NormLayer",
        ),
        ("type:(Block", 2, None, r"pipeline\.partition=type:\(Block: '\(Block' is not a valid regex"),
    ],
)
def test_resolve_partition_errors(method: str, stages: int, boundaries: list[int] | None, match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        resolve(method, stages, boundaries)


# --- the real layer plan against a real DeepSpeed partition -------------------------------------


def llama_config() -> Any:
    return tiny_hf_config("llama")  # 3 blocks, untied


def qwen2_tied_config() -> Any:
    return tiny_hf_config("qwen2")  # 4 blocks, tied, q/k/v biases


def gpt2_tied_config() -> Any:
    # Learned positions (n_positions x n_embd) as large as half the token embedding, so that the
    # embed layer (tokens + positions) and the tied head (tokens only) differ widely in parameters.
    cfg = tiny_hf_config("gpt2")
    cfg.n_positions = cfg.vocab_size // 2
    return cfg


CONFIGS = [
    pytest.param(llama_config, id="llama-untied"),
    pytest.param(qwen2_tied_config, id="qwen2-tied"),
    pytest.param(gpt2_tied_config, id="gpt2-tied"),
]


def deepspeed_param_counts(skeleton) -> list[int]:
    """Per-layer counts as DeepSpeed's PipelineModule computes them for partition_method='parameters'.

    DeepSpeed builds each layer spec on its own and counts its trainable parameters; a tied
    layer is built (and counted) in full at every position it occupies. Both ways of getting
    there must agree: DeepSpeed's own counting over pipefit's specs, and pipefit's layers built
    one at a time.
    """
    specs = layer_specs(skeleton)
    ds_counts = PipelineModule._count_layer_params(SimpleNamespace(_layer_specs=specs))
    built = []
    for i in range(len(specs)):
        (layer,) = build_layers(skeleton, i, i + 1)
        built.append(sum(p.numel() for p in layer.parameters() if p.requires_grad))
    assert built == ds_counts
    return ds_counts


def test_layer_plan_order_and_counts_untied() -> None:
    skeleton = make_skeleton(llama_config())
    plan = layer_plan(skeleton)
    assert [layer.kind for layer in plan] == ["embed", "block", "block", "block", "norm", "head"]
    assert [layer.index for layer in plan] == list(range(6))
    assert [layer.block_index for layer in plan] == [None, 0, 1, 2, None, None]
    assert plan[0].hf_prefixes == ("model.embed_tokens",)
    assert plan[-1].hf_prefixes == ("lm_head",)
    assert [layer.tied for layer in plan] == [False] * 6
    # vocab 4096 x hidden 64 for embedding and head; RMSNorm weight 64.
    assert (VOCAB_SIZE, HIDDEN) == (4096, 64)
    assert plan[0].num_params == 4096 * 64
    assert plan[-1].num_params == 4096 * 64
    assert plan[-2].num_params == 64
    # The full model's parameters are exactly the plan's (untied: nothing counted twice).
    assert sum(layer.num_params for layer in plan) == sum(p.numel() for p in skeleton.model.parameters())


def test_layer_plan_order_tied() -> None:
    skeleton = make_skeleton(qwen2_tied_config())
    plan = layer_plan(skeleton)
    assert [layer.kind for layer in plan] == ["embed", "block", "block", "block", "block", "norm", "head"]
    assert plan[0].tied and plan[-1].tied
    assert plan[-1].hf_prefixes == ("model.embed_tokens",)
    assert plan[-1].num_params == plan[0].num_params == 4096 * 64


@pytest.mark.parametrize("make_config", CONFIGS)
def test_plan_counts_equal_deepspeed_counts(make_config) -> None:
    skeleton = make_skeleton(make_config())
    plan = layer_plan(skeleton)
    assert [layer.num_params for layer in plan] == deepspeed_param_counts(skeleton)


@pytest.mark.parametrize("make_config", CONFIGS)
def test_parameters_partition_equals_deepspeed_pipeline_module(make_config) -> None:
    skeleton = make_skeleton(make_config())
    counts = deepspeed_param_counts(skeleton)
    num_layers = len(counts)
    expected_two = [int(x) for x in ds_utils.partition_balanced(weights=counts, num_parts=2)]
    assert boundaries_for(skeleton, "parameters", 2, None) == expected_two
    for stages in range(1, num_layers + 1):
        expected = [int(x) for x in ds_utils.partition_balanced(weights=counts, num_parts=stages)]
        assert boundaries_for(skeleton, "parameters", stages, None) == expected, stages


def test_parameters_partition_llama_known_answer() -> None:
    # Embedding and head (262144 each) outweigh a block (36992): at 4 stages each gets a stage of
    # its own, where uniform pairs the embedding with a block and gives the 64-parameter norm a stage.
    skeleton = make_skeleton(llama_config())
    assert boundaries_for(skeleton, "parameters", 4, None) == [0, 1, 3, 5, 6]
    assert boundaries_for(skeleton, "uniform", 4, None) == [0, 2, 4, 5, 6]


@pytest.mark.parametrize("make_config", [llama_config, qwen2_tied_config, gpt2_tied_config])
@pytest.mark.parametrize("type_name", ["EmbedLayer", "BlockLayer", "NormLayer", "layer", "embed|norm"])
def test_type_partition_equals_deepspeed_on_its_class_names(make_config, type_name: str) -> None:
    """type:REGEX over the classes DeepSpeed sees (LayerSpec.typename) picks the layers DeepSpeed picks."""
    skeleton = make_skeleton(make_config())
    specs = SimpleNamespace(_layer_specs=layer_specs(skeleton))
    hits = set(PipelineModule._find_layer_type(specs, type_name))
    weights = [int(i in hits) for i in range(len(specs._layer_specs))]
    for stages in (1, 2, 3):
        expected = [int(x) for x in ds_utils.partition_balanced(weights=weights, num_parts=stages)]
        assert boundaries_for(skeleton, f"type:{type_name}", stages, None) == expected
