"""balance.partition_min_max against brute force: every contiguous split enumerated."""

from __future__ import annotations

import itertools
import random

import pytest

from pipefit.partition.balance import (
    PartitionError,
    StageMemory,
    partition_balanced,
    partition_min_max,
    partition_uniform,
    resolve_partition,
    stage_costs,
)


def all_splits(n: int, p: int) -> list[list[int]]:
    return [[0, *cuts, n] for cuts in itertools.combinations(range(1, n), p - 1)]


def brute_force(costs, p, memory=None, cap=None, boundary_costs=None, trainable=None):
    """The documented order: smallest bottleneck, then smallest sum of squares, then largest boundaries."""
    best = None
    for b in all_splits(len(costs), p):
        if cap is not None and any(memory(s, b[s], b[s + 1]) > cap for s in range(p)):
            continue
        if trainable is not None and not all(any(trainable[b[s] : b[s + 1]]) for s in range(p)):
            continue
        c = stage_costs(costs, b, boundary_costs)
        key = (max(c), sum(x * x for x in c), [-x for x in b])
        if best is None or key < best:
            best = key
    return None if best is None else [-x for x in best[2]]


def min_cap(n, p, memory):
    return min(max(memory(s, b[s], b[s + 1]) for s in range(p)) for b in all_splits(n, p))


def random_costs(rng: random.Random, n: int, case: int) -> list[float]:
    if case % 3 == 0:
        return [float(rng.choice([0, 1, 1, 2, 3])) for _ in range(n)]  # many ties
    if case % 3 == 1:
        return [float(rng.randint(0, 1000)) for _ in range(n)]
    return [float(rng.choice([1, 1, 1, 50])) for _ in range(n)]  # a few heavy layers (embedding, head)


def test_matches_brute_force_without_memory() -> None:
    rng = random.Random(11)
    for case in range(600):
        n = rng.randint(1, 10)
        p = rng.randint(1, n)
        costs = random_costs(rng, n, case)
        ours = partition_min_max(costs, p)
        assert ours == brute_force(costs, p), (costs, p)
        assert all(ours[s + 1] > ours[s] for s in range(p))


def test_matches_brute_force_with_boundary_costs() -> None:
    rng = random.Random(12)
    for case in range(300):
        n = rng.randint(2, 9)
        p = rng.randint(1, n)
        costs = random_costs(rng, n, case)
        cuts = [float(rng.randint(0, 5)) for _ in range(n + 1)]
        assert partition_min_max(costs, p, boundary_costs=cuts) == brute_force(costs, p, boundary_costs=cuts)


def test_every_stage_keeps_a_trainable_layer() -> None:
    """LoRA / train.freeze: a stage with nothing to train is never chosen (DeepSpeed builds no optimizer
    for it), and the split is otherwise the cheapest, as brute force finds it."""
    rng = random.Random(13)
    for case in range(300):
        n = rng.randint(2, 9)
        trainable = [rng.random() < 0.6 for _ in range(n)]
        if sum(trainable) < 1:
            continue
        p = rng.randint(1, sum(trainable))
        costs = random_costs(rng, n, case)
        assert partition_min_max(costs, p, trainable=trainable) == brute_force(costs, p, trainable=trainable)
    # A LoRA llama: adapters on the blocks only, a heavy head; unconstrained, the head gets a stage alone.
    costs, lora = [0.0, 10.0, 10.0, 10.0, 1.0, 40.0], [False, True, True, True, False, False]
    assert partition_min_max(costs, 2) == [0, 5, 6]
    assert partition_min_max(costs, 2, trainable=lora) == [0, 3, 6]  # stage 1 keeps block 3
    with pytest.raises(PartitionError, match=r"only 3 of the 6 pipeline layers have parameters to train"):
        partition_min_max(costs, 4, trainable=lora)


def test_matches_brute_force_with_1f1b_memory_caps() -> None:
    rng = random.Random(13)
    feasible = infeasible = 0
    for case in range(500):
        n = rng.randint(2, 9)
        p = rng.randint(1, n)
        costs = random_costs(rng, n, case)
        model = StageMemory(
            static=[float(rng.randint(0, 20)) for _ in range(n)],
            activation=[float(rng.randint(0, 6)) for _ in range(n)],
            micro_batches=rng.randint(1, 6),
            fixed=float(rng.randint(0, 3)),
        )
        memory = model.bind(p)
        smallest = min_cap(n, p, memory)
        cap = smallest + rng.choice([-1.0, 0.0, 0.0, 3.0, 10.0, 100.0])
        expected = brute_force(costs, p, memory, cap)
        if expected is None:
            infeasible += 1
            with pytest.raises(PartitionError, match=rf"smallest per-stage cap that would fit is {smallest:.6g}\b"):
                partition_min_max(costs, p, model, cap)
        else:
            feasible += 1
            got = partition_min_max(costs, p, model, cap)
            assert got == expected, (costs, p, model, cap)
            assert max(memory(s, got[s], got[s + 1]) for s in range(p)) <= cap
    assert feasible > 300 and infeasible > 50


def test_cap_changes_the_answer_and_stage_index_matters() -> None:
    costs = [1.0, 4.0, 4.0, 4.0, 4.0, 1.0]
    assert partition_min_max(costs, 2) == [0, 3, 6]
    # Activations: stage 0 of 2 holds min(2, 4) = 2 micro-batches, stage 1 holds 1.
    model = StageMemory(static=[0.0] * 6, activation=[1.0] * 6, micro_batches=4)
    assert model.stage_bytes(0, 2, 0, 3) == 6.0 and model.stage_bytes(1, 2, 3, 6) == 3.0
    # A cap of 5 forbids 3 layers on stage 0 (6 bytes), so the first stage gets 2 layers.
    assert partition_min_max(costs, 2, model, 5.0) == [0, 2, 6]
    with pytest.raises(PartitionError, match=r"memory_cap=3\.9: .* smallest per-stage cap that would fit is 4\b"):
        partition_min_max(costs, 2, model, 3.9)


def test_beats_parameters_and_uniform_on_a_large_vocab_model() -> None:
    # Embedding ~0, 16 equal blocks, cheap norm, head as heavy as 5 blocks (Llama-3.2-1B-like by FLOPs).
    costs = [0.0] + [1.0] * 16 + [0.01, 5.0]
    params = [263] + [61] * 16 + [0, 263]
    p = 4
    ours = stage_costs(costs, partition_min_max(costs, p))
    by_params = stage_costs(costs, partition_balanced(params, p))
    by_layers = stage_costs(costs, partition_uniform(len(costs), p))
    assert max(ours) == pytest.approx(6.0)
    assert max(ours) < max(by_params) and max(ours) < max(by_layers)


def test_ties_toward_even_then_more_layers_first() -> None:
    # Four splits reach bottleneck 4: (4,1,4) and (4,4,1) [0,1,5,6] have squares 33, (4,2,3) and
    # (4,3,2) have 29; the even pair wins over the lexicographically larger [0,1,5,6], then [0,1,4,6].
    assert partition_min_max([4.0, 1.0, 1.0, 1.0, 1.0, 1.0], 3) == [0, 1, 4, 6]
    # Fully symmetric: (1, 2) and (2, 1) tie on everything; the larger boundaries win.
    assert partition_min_max([1.0, 1.0, 1.0], 2) == [0, 2, 3]
    assert partition_min_max([0.0, 0.0, 0.0, 0.0], 4) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"costs": [1.0, 2.0], "num_stages": 3}, r"pipeline\.stages=3 exceeds the 2 pipeline layers"),
        ({"costs": [1.0], "num_stages": 0}, r"pipeline\.stages=0 must be at least 1"),
        ({"costs": [1.0, -2.0], "num_stages": 1}, r"cost of layer 1 is -2\.0; costs must be finite numbers >= 0"),
        ({"costs": [1.0, float("nan")], "num_stages": 1}, r"cost of layer 1 is nan"),
        ({"costs": [1.0], "num_stages": 1, "memory_cap": 3.0}, r"memory_cap=3\.0 was given without a memory model"),
        ({"costs": [1.0, 1.0], "num_stages": 1, "memory": [1.0]}, r"memory has 1 entries for 2 layers"),
        ({"costs": [1.0], "num_stages": 1, "boundary_costs": [0.0]}, r"boundary_costs has 1 entries; expected 2"),
    ],
)
def test_bad_inputs_are_one_line_errors(kwargs, match) -> None:
    with pytest.raises(PartitionError, match=match) as info:
        partition_min_max(**kwargs)
    assert "\n" not in str(info.value)


def test_resolve_partition_cost_methods() -> None:
    names = [("L",)] * 5
    costs = [0.0, 1.0, 1.0, 1.0, 3.0]
    assert resolve_partition("flops", 2, [1] * 5, names, costs=costs) == [0, 4, 5]
    assert resolve_partition("profile", 2, [1] * 5, names, costs=costs) == [0, 4, 5]
    assert resolve_partition("parameters", 2, [1] * 5, names, costs=costs) == [0, 3, 5]
    with pytest.raises(PartitionError, match=r"pipeline\.partition=flops needs per-layer costs"):
        resolve_partition("flops", 2, [1] * 5, names)
    with pytest.raises(PartitionError, match=r"accepted: uniform, parameters, flops, profile, type:REGEX, manual"):
        resolve_partition("bogus", 2, [1] * 5, names)
