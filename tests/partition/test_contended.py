"""The contended profile and the simulator's busy transfers: what ``pipefit plan --costs profile`` prices."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from conftest import tiny_hf_config
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition import calibrate, contended, contention
from pipefit.partition.balance import StageMemory
from pipefit.partition.costs import Hardware, LayerCosts, Workload
from pipefit.partition.plan import evaluate, settled


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
    assert measured.alone is not None and len(measured.alone) == len(plan)  # rank 0 again, the other idle
    assert all(p.forward_s > 0 and p.backward_s > 0 for p in measured.alone)


def test_a_worker_that_dies_is_an_error_not_a_hang() -> None:
    """A rank that fails before it reports (here: a layer index the model does not have) ends the
    measurement with an error naming the exit codes; the parent used to wait for its result forever."""
    skeleton = make_skeleton(tiny_hf_config("llama"), seed=0)
    missing = SimpleNamespace(index=10_000)
    workload = Workload(micro_batch_size=1, seq_len=8, micro_batches=1)
    with pytest.raises(RuntimeError, match="a worker failed"):
        contended._spawn(skeleton, [missing], workload, ranks=2, runs=1)


def test_a_stage_whose_peer_idles_is_priced_alone_one_whose_peer_computes_contended() -> None:
    """pp=2, m=2, no transfers. Contended: stage 0 forward 1 / backward 2 s, stage 1 forward 3 / backward 6;
    alone: half of that. Stage 0's peer computes nearly the whole step, so stage 0 stays near its contended
    price; stage 1's peer computes a fifth of it, so stage 1 moves most of the way to its alone price. The
    step follows, at the fixed point of prices and busy shares. Without alone prices the step is 21 s."""
    costs, plan = _two_layers(False)
    costs = replace(costs, forward_s=[1.0, 3.0], backward_s=[2.0, 6.0], transfer_s=0.0, per_step_s=[0.0, 0.0])
    plain = evaluate(costs, plan, [0, 1, 2])["predicted_step_s"]
    # F0 0-1 | stage 1: F0 1-4, B0 4-10, F1 10-13, B1 13-19 | stage 0: F1 1-2, B0 10-12, B1 19-21
    assert plain == pytest.approx(21.0)
    mixed = replace(costs, alone_forward_s=[0.5, 1.5], alone_backward_s=[1.0, 3.0])
    report = evaluate(mixed, plan, [0, 1, 2])
    ops = report["timeline"]
    busy = [sum(e - s for st, k, _, s, e in ops if st == x and k in "FB") for x in range(2)]
    step = report["predicted_step_s"]
    u = contention.peer_busy(busy, step)
    # the fixed point: stage s priced at alone + (contended - alone) * u[peer's share]
    f0, f1 = 0.5 + 0.5 * u[0], 1.5 + 1.5 * u[1]
    assert busy[0] == pytest.approx(2 * 3 * f0, rel=1e-3) and busy[1] == pytest.approx(2 * 3 * f1, rel=1e-3)
    assert u[0] > 0.8 and u[1] < 0.4
    assert step == pytest.approx(f0 + 6 * f1 + 2 * f0, rel=1e-3)  # stage 0's F0, stage 1's two F+B, stage 0's B1
    assert 10.5 < step < 21.0 * 0.75


def test_peer_busy_is_the_mean_share_of_the_other_stages() -> None:
    assert contention.peer_busy([4.0, 2.0], 8.0) == [0.25, 0.5]
    assert contention.peer_busy([4.0, 2.0, 8.0], 8.0) == [0.625, 0.75, 0.375]
    assert contention.peer_busy([9.0], 8.0) == [1.0]
    assert contention.peer_busy([20.0, 20.0], 8.0) == [1.0, 1.0]


def test_settled_prices_are_what_the_split_ran_at_and_calibrate_against_them() -> None:
    """``settled``: each layer at its stage's mix for that split, no alone prices left, and the same step. A
    trace that measured exactly those prices calibrates to ratios of 1 (against the contended prices it
    would read the mix as a speed-up)."""
    costs, plan = _two_layers(False)
    costs = replace(costs, forward_s=[1.0, 3.0], backward_s=[2.0, 6.0], transfer_s=0.0, per_step_s=[0.0, 0.0])
    mixed = replace(costs, alone_forward_s=[0.5, 1.5], alone_backward_s=[1.0, 3.0])
    ran, alone = settled(mixed, plan, [0, 1, 2])
    assert ran.alone_forward_s == [] and ran.alone_backward_s == []
    assert 0.5 < ran.forward_s[0] <= 1.0 and 1.5 < ran.forward_s[1] < 3.0
    assert ran.backward_s == pytest.approx([2 * f for f in ran.forward_s])
    step = evaluate(mixed, plan, [0, 1, 2])["predicted_step_s"]
    assert evaluate(ran, plan, [0, 1, 2])["predicted_step_s"] == pytest.approx(step, rel=1e-3)
    m = ran.micro_batches
    measured = {s: {"ForwardPass": m * ran.forward_s[s], "BackwardPass": m * ran.backward_s[s]} for s in range(2)}
    cal = calibrate.fit(ran, [0, 1, 2], measured)
    assert (cal.forward, cal.backward) == (pytest.approx(1.0), pytest.approx(1.0))
    assert calibrate.fit(mixed, [0, 1, 2], measured).forward < 0.8


def _measured(scale: float, link: float | None) -> contended.Measured:
    layer = [
        {"forward_s": scale * k, "backward_s": 2 * scale * k, "activation_bytes": 8.0, "runs": 6, "spread": 0.0}
        for k in (1, 2, 3, 4)
    ]  # embed, block, norm, head: the distinct layers of a tiny Llama
    return contended.Measured(layer, 1e-4 * scale, 1e-8 * scale, link, [dict(x, forward_s=0.5 * scale) for x in layer])


def test_rounds_of_contended_measurements_combine_by_median_per_figure() -> None:
    """The partition benchmark measures the contended profile in every round between its steps and prices
    with the median of each figure; ranks combine as rank 0's layers, the slowest link."""
    rounds = [_measured(s, link) for s, link in ((1.0, 2.0), (4.0, 1.0), (2.0, 4.0))]
    med = contended.over_rounds(rounds)
    assert [x["forward_s"] for x in med.layers] == [2.0, 4.0, 6.0, 8.0]
    assert [x["backward_s"] for x in med.layers] == [4.0, 8.0, 12.0, 16.0]
    assert [x["forward_s"] for x in med.alone] == [1.0] * 4
    assert (med.transfer_s, med.optimizer_s_per_param, med.link_gbs) == (2e-4, 2e-8, 2.0)
    ranks = contended.combine([_measured(1.0, 3.0), _without_alone(_measured(5.0, 0.5))])
    assert ranks.layers[1]["forward_s"] == 2.0 and ranks.alone[0]["forward_s"] == 0.5
    assert ranks.link_gbs == 0.5 and ranks.transfer_s == pytest.approx(3e-4)
    skeleton = make_skeleton(tiny_hf_config("llama"))
    plan = layer_plan(skeleton)
    prof = contended.contended_profile(skeleton, plan, med, ranks=2)
    kinds = [layer.kind for layer in plan]
    assert [p.forward_s for p in prof.layers] == [
        {"embed": 2.0, "block": 4.0, "norm": 6.0, "head": 8.0}[k] for k in kinds
    ]
    assert prof.link_bandwidth_gbs == 2.0 and [p.forward_s for p in prof.alone] == [1.0] * len(plan)


def _without_alone(m: contended.Measured) -> contended.Measured:
    return m._replace(alone=[])  # ranks other than 0 time nothing alone


def test_calibration_scales_only_the_busy_part_of_a_settled_price() -> None:
    """A trace whose stages computed their alone part as priced and their busy part 1.5x slower calibrates
    the contended prices by exactly 1.5 and leaves the alone ones: a stage whose peer idles is not charged
    for contention it did not meet. Where under a quarter of the price was busy, one ratio covers both."""
    costs, plan = _two_layers(False)
    costs = replace(costs, forward_s=[1.0, 3.0], backward_s=[2.0, 6.0], transfer_s=0.0, per_step_s=[0.0, 0.0])
    mixed = replace(costs, alone_forward_s=[0.5, 1.5], alone_backward_s=[1.0, 3.0])
    bounds = [0, 1, 2]
    ran, alone = settled(mixed, plan, bounds)
    m = ran.micro_batches
    u = [row["peer_busy"] for row in evaluate(mixed, plan, bounds)["stages"]]
    assert alone[0] == pytest.approx([0.5 * (1 - u[0]), 1.5 * (1 - u[1])])
    assert ran.forward_s == pytest.approx([a + c * x for a, c, x in zip(alone[0], [1.0, 3.0], u, strict=True)])
    measured = {
        s: {
            "ForwardPass": m * (alone[0][s] + 1.5 * (ran.forward_s[s] - alone[0][s])),
            "BackwardPass": m * (alone[1][s] + 1.5 * (ran.backward_s[s] - alone[1][s])),
        }
        for s in range(2)
    }
    cal = calibrate.fit(ran, bounds, measured, alone=alone)
    assert (cal.forward, cal.backward) == (pytest.approx(1.5), pytest.approx(1.5))
    assert (cal.alone_forward, cal.alone_backward) == (1.0, 1.0)
    out = calibrate.apply(mixed, cal)
    assert out.forward_s == pytest.approx([1.5, 4.5]) and out.alone_forward_s == [0.5, 1.5]
    whole = calibrate.fit(ran, bounds, measured)  # no alone part given: one ratio, below 1.5
    assert 1.0 < whole.forward < 1.5 and whole.alone_forward == whole.forward
    mostly_alone = [[0.9 * f for f in ran.forward_s], [0.9 * b for b in ran.backward_s]]
    cal = calibrate.fit(ran, bounds, measured, alone=mostly_alone)
    assert cal.forward == pytest.approx(whole.forward) and cal.alone_forward == pytest.approx(whole.forward)
