"""The ZB-H1 order and the zero-bubble step simulation (pure; the schedule's own tests are in tests/run)."""

from __future__ import annotations

import pytest

from pipefit.partition.zero_bubble_sim import Op, one_f_one_b_order, simulate, zb_h1_order


def test_zb_h1_order_holds_back_the_first_s_weight_passes_of_stage_s():
    order = [" ".join(f"{k}{i}" for k, i in zb_h1_order(4, 8, s)) for s in range(4)]
    assert order == [
        "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7",
        "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 F6 B4 W3 F7 B5 W4 B6 W5 B7 W6 W7",
        "F0 F1 B0 F2 B1 F3 B2 W0 F4 B3 W1 F5 B4 W2 F6 B5 W3 F7 B6 W4 B7 W5 W6 W7",
        "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 W5 W6 W7",
    ]


@pytest.mark.parametrize("stages,micro_batches", [(2, 4), (2, 8), (4, 4), (4, 8), (8, 16)])
@pytest.mark.parametrize("f,b,w", [(1.0, 1.0, 1.0), (1.0, 1.2, 0.8)])
def test_simulated_step_is_zb_h1s_and_shorter_than_1f1bs(stages: int, micro_batches: int, f: float, b: float, w: float):
    p, m = stages, micro_batches
    one, _ = simulate([one_f_one_b_order(p, m, s) for s in range(p)], [f] * p, [b + w] * p, [0.0] * p)
    zb, spans = simulate([zb_h1_order(p, m, s) for s in range(p)], [f] * p, [b] * p, [w] * p)
    assert one == pytest.approx((m + p - 1) * (f + b + w))
    # ZB-H1's step (Qi et al. 2024): the bubble shrinks from (p-1)(F+B+W) to (p-1)(F+B-W).
    assert zb == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))
    assert sum(1 for s in spans for k, *_ in s if k == "W") == p * m


def test_one_f_one_b_order_is_deepspeeds():
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    for p, m in [(2, 1), (2, 4), (4, 2), (4, 8)]:
        for s in range(p):
            kinds = [
                "F" if isinstance(c, ForwardPass) else "B"
                for cmds in TrainSchedule(micro_batches=m, stages=p, stage_id=s)
                for c in cmds
                if isinstance(c, (ForwardPass, BackwardPass))
            ]
            assert [o.kind for o in one_f_one_b_order(p, m, s)] == kinds


def test_an_order_that_deadlocks_is_refused():
    orders = [[Op("B", 0), Op("F", 0)], [Op("F", 0), Op("B", 0)]]
    with pytest.raises(ValueError, match="deadlock"):
        simulate(orders, [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])
