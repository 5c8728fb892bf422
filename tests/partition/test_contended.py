"""The contended profile and the simulator's busy transfers: what ``pipefit plan --costs profile`` prices."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from conftest import tiny_hf_config
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition import contended
from pipefit.partition.balance import StageMemory
from pipefit.partition.costs import Hardware, LayerCosts, Workload
from pipefit.partition.plan import evaluate


def _two_layers(transfer_busy: bool) -> tuple[LayerCosts, list]:
    plan = [SimpleNamespace(index=i, kind="block", num_params=10, tied=False) for i in range(2)]
    costs = LayerCosts(
        method="profile",
        forward_s=[1.0, 1.0],
        backward_s=[2.0, 2.0],
        per_step_s=[0.25, 0.25],
        transfer_s=0.5,
        micro_batches=2,
        memory=StageMemory(static=[0.0, 0.0], activation=[0.0, 0.0], micro_batches=2),
        memory_cap=1.0,
        attention_masks=[None, None],
        transfer_busy=transfer_busy,
    )
    return costs, plan


def test_busy_transfers_occupy_both_stages() -> None:
    """pp=2, m=2, forward 1 s, backward 2 s, transfer 0.5 s. Busy (a blocking send and its receive): every
    forward and backward takes 1.5 and 2.5 s on both stages: stage 1 runs F0 1.5-3, B0 3-5.5, F1 5.5-7,
    B1 7-9.5; stage 0's B1 runs 9.5-12, then its per-step work: 12.25 s. As flight time only, 10.25 s."""
    busy, plan = _two_layers(True)
    assert evaluate(busy, plan, [0, 1, 2])["predicted_step_s"] == pytest.approx(12.25)
    latency, plan = _two_layers(False)
    assert evaluate(latency, plan, [0, 1, 2])["predicted_step_s"] == pytest.approx(10.25)


def test_contended_costs_price_the_optimizer_by_parameters() -> None:
    cfg = tiny_hf_config("llama")
    plan = layer_plan(make_skeleton(cfg))
    work = Workload(seq_len=16, micro_batch_size=2, micro_batches=4, dp=2)
    profiles = [contended.LayerProfile(1e-3 * (i + 1), 2e-3 * (i + 1), 100.0, 5, 0.0) for i in range(len(plan))]
    measured = contended.ContendedProfile(profiles, transfer_s=4e-4, optimizer_s_per_param=3e-8, ranks=2)
    hw = Hardware()
    costs = contended.contended_costs(cfg, plan, work, hw, measured)
    assert costs.transfer_busy and costs.transfer_s == 4e-4
    assert costs.forward_s == [p.forward_s for p in profiles]
    # ZeRO-1 over dp=2 halves the optimizer's work; the gradient all-reduce moves 2 (dp-1)/dp x 4 bytes.
    link = hw.link_bandwidth_gbs * 1e9
    for layer, t in zip(plan, costs.per_step_s, strict=True):
        assert t == pytest.approx(layer.num_params * (3e-8 / 2 + 4 / link))
    assert replace(costs, transfer_busy=False).boundary_costs() == costs.boundary_costs()
    # A measured all-reduce bandwidth (0.25 GB/s, far below the preset's) prices the reduction instead.
    slow = contended.contended_costs(cfg, plan, work, hw, replace(measured, link_bandwidth_gbs=0.25))
    for layer, t in zip(plan, slow.per_step_s, strict=True):
        assert t == pytest.approx(layer.num_params * (3e-8 / 2 + 4 / 0.25e9))
    assert slow.details["link_bandwidth_gbs"] == 0.25


@pytest.mark.slow
def test_measure_contended_times_every_layer_with_two_ranks_busy() -> None:
    cfg = tiny_hf_config("llama")
    skeleton = make_skeleton(cfg)
    plan = layer_plan(skeleton)
    work = Workload(seq_len=16, micro_batch_size=2, micro_batches=2)
    measured = contended.measure_contended(skeleton, plan, work, ranks=2, runs=2)
    assert len(measured.layers) == len(plan) and measured.ranks == 2
    blocks = [p for layer, p in zip(plan, measured.layers, strict=True) if layer.kind == "block"]
    assert len({(p.forward_s, p.backward_s) for p in blocks}) == 1  # identical blocks measured once
    assert all(p.forward_s > 0 and p.backward_s > 0 for p in measured.layers)
    assert 0 < measured.transfer_s < 1.0
    assert 1e-11 < measured.optimizer_s_per_param < 1e-5
    assert 1e-3 < measured.link_bandwidth_gbs < 1e3  # gloo's all-reduce over the two ranks, measured


def test_a_worker_that_dies_is_an_error_not_a_hang() -> None:
    """A rank that fails before it reports (here: a layer index the model does not have) ends the
    measurement with an error naming the exit codes; the parent used to wait for its result forever."""
    skeleton = make_skeleton(tiny_hf_config("llama"), seed=0)
    missing = SimpleNamespace(index=10_000)
    workload = Workload(micro_batch_size=1, seq_len=8, micro_batches=1)
    with pytest.raises(RuntimeError, match="a worker failed"):
        contended._spawn(skeleton, [missing], workload, ranks=2, runs=1)
