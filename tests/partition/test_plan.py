"""pipefit plan: the 1F1B simulator on hand-computed cases, the plan's figures, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipefit.cli import compose, main
from pipefit.config import validate
from pipefit.partition.plan import format_plan, make_plan
from pipefit.partition.simulate_1f1b import bubble_fraction, simulate_1f1b
from pipefit.partition.zero_bubble_sim import one_f_one_b_order


def test_bubble_fraction() -> None:
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(8, 8) == pytest.approx(7 / 15)


def test_1f1b_order_matches_deepspeed_warmup() -> None:
    # Stage s runs min(p - s - 1, m) forwards before its first backward.
    assert one_f_one_b_order(2, 3, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert one_f_one_b_order(2, 3, 1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert one_f_one_b_order(4, 2, 0) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_one_stage_is_all_work_plus_the_optimizer() -> None:
    t = simulate_1f1b([1.0], [2.0], micro_batches=4, step_s=[0.5])
    assert t.step_s == pytest.approx(4 * 3 + 0.5)


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 8), (4, 8), (4, 2), (8, 16)])
def test_equal_stages_take_m_plus_p_minus_1_slots(p: int, m: int) -> None:
    # The textbook 1F1B result: (m + p - 1) (F + B); the idle share is the bubble fraction.
    t = simulate_1f1b([1.0] * p, [2.0] * p, micro_batches=m)
    assert t.step_s == pytest.approx((m + p - 1) * 3.0)
    idle = 1 - sum(t.busy(s) for s in range(p)) / (p * t.step_s)
    assert idle == pytest.approx(bubble_fraction(p, m))


def test_transfers_delay_each_hop() -> None:
    # One micro-batch through 2 stages: F, hop, F, B, hop, B.
    t = simulate_1f1b([1.0, 1.0], [2.0, 2.0], micro_batches=1, transfer_s=0.25)
    assert t.step_s == pytest.approx(6 + 2 * 0.25)


def test_unequal_stages_by_hand() -> None:
    # Stage 1 (B = 3) is the bottleneck: sum(F + B) + (m - 1) * max(F + B) = 6 + 4.
    t = simulate_1f1b([1.0, 1.0], [1.0, 3.0], micro_batches=2)
    assert t.step_s == pytest.approx(10.0)
    starts = {(s, k, i): start for s, k, i, start, _ in t.ops}
    assert starts[(0, "B", 0)] == 5.0 and starts[(0, "B", 1)] == 9.0


def test_tied_stages_wait_for_each_other() -> None:
    # Stage 1 finishes its backwards at 3, stage 0 at 4; per-step work 0.5 and 2.
    free = simulate_1f1b([1.0, 1.0], [1.0, 1.0], micro_batches=1, step_s=[0.5, 2.0])
    tied = simulate_1f1b([1.0, 1.0], [1.0, 1.0], micro_batches=1, step_s=[0.5, 2.0], tied_stages=[0, 1])
    assert free.step_s == pytest.approx(5.0)
    assert tied.step_s == pytest.approx(6.0)


def test_plan_figures_for_the_default_model() -> None:
    run = validate(compose(["pipeline.partition=flops", "pipeline.stages=2"]))
    report = make_plan(run)
    assert report["bubble_fraction"] == pytest.approx(1 / 5)  # p=2, m=4 (train.grad_accum_steps)
    assert set(report["methods"]) == {"flops", "uniform", "parameters"}
    assert report["num_layers"] == 7 and len(report["layers"]) == 7
    flops, params = report["methods"]["flops"], report["methods"]["parameters"]
    assert params["boundaries"] == [0, 3, 7]
    assert flops["bottleneck_over_mean"] < params["bottleneck_over_mean"]
    assert flops["predicted_step_s"] < params["predicted_step_s"]
    rows = flops["stages"]
    assert [r["layers"] for r in rows] == [[0, flops["boundaries"][1]], [flops["boundaries"][1], 7]]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["params"] for r in rows) == sum(x["params"] for x in report["layers"])
    assert [r["in_flight_micro_batches"] for r in rows] == [2, 1]
    # The simulator never beats the sum of the bottleneck stage's own work.
    slowest = max(rows, key=lambda r: r["forward_s"] + r["backward_s"])
    assert flops["predicted_step_s"] >= report["micro_batches"] * (slowest["forward_s"] + slowest["backward_s"])


@pytest.mark.parametrize(
    ("preset", "flops_bounds", "params_bounds"),
    [
        ("llama_tiny", [0, 4, 7], [0, 3, 7]),
        ("gpt2_tiny", [0, 4, 7], [0, 3, 7]),
        ("bert_tiny", [0, 4, 7], [0, 3, 7]),  # masked LM: blocks, transform, tied decoder
        ("bert_cls_tiny", [0, 3, 7], [0, 2, 7]),  # classification: blocks, pooler, classifier
    ],
)
def test_the_default_partition_has_the_smallest_bottleneck(
    preset: str, flops_bounds: list[int], params_bounds: list[int]
) -> None:
    """With no partition override the split is pipefit's cost-based one, for decoders and encoders alike,
    and no other method's split has a smaller slowest stage under the same prices."""
    report = make_plan(validate(compose([f"model={preset}"])))
    assert report["chosen"] == "flops" and report["cost_model"] == "flops"
    methods = report["methods"]
    assert set(methods) == {"flops", "uniform", "parameters"}
    assert methods["flops"]["boundaries"] == flops_bounds and methods["parameters"]["boundaries"] == params_bounds
    best = methods["flops"]["bottleneck_s"]
    assert all(best <= m["bottleneck_s"] for m in methods.values())
    assert best < methods["parameters"]["bottleneck_s"]


def test_plan_counts_dense_attention_masks_of_packed_rows() -> None:
    """sdpa over packed rows keeps a [b,1,s,s] bool mask per micro-batch in flight (one per stage, not per block)."""
    args = ["pipeline.partition=flops", "pipeline.stages=2"]
    concat = make_plan(validate(compose(args)))
    pack = make_plan(validate(compose([*args, "data.layout=pack"])))
    per_micro_batch = 4 * 128 * 128  # train.micro_batch_size x data.seq_len^2, bool
    rows_c, rows_p = concat["methods"]["flops"]["stages"], pack["methods"]["flops"]["stages"]
    assert [r["mask_bytes"] for r in rows_c] == [0, 0]
    assert [r["mask_bytes"] for r in rows_p] == [2 * per_micro_batch, 1 * per_micro_batch]  # in flight: 2, 1
    assert [p["memory_bytes"] - c["memory_bytes"] for p, c in zip(rows_p, rows_c, strict=True)] == [
        2 * per_micro_batch,
        per_micro_batch,
    ]
    assert "memory includes dense [b,1,s,s] attention masks (sdpa, data.layout=pack), one per micro-batch in " in (
        format_plan(pack)
    )
    assert "attention masks" not in format_plan(concat)


def test_plan_hardware_group_changes_the_prediction() -> None:
    cpu = make_plan(validate(compose(["pipeline.partition=flops"])))
    h100 = make_plan(validate(compose(["pipeline.partition=flops", "hardware=h100"])))
    assert h100["hardware"] == "h100" and cpu["hardware"] == "cpu"
    assert h100["methods"]["flops"]["predicted_step_s"] < cpu["methods"]["flops"]["predicted_step_s"] / 100


def test_cli_json_text_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "plan.png"
    assert main(["plan", "pipeline.partition=flops", "pipeline.stages=3", "--json", "--png", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("layers", "methods", "bubble_fraction", "chosen", "hardware", "memory_cap_bytes", "transfer_s"):
        assert key in report
    chosen = report["methods"]["flops"]
    assert len(chosen["boundaries"]) == 4 and report["bubble_fraction"] == pytest.approx(2 / 6)
    assert {"bottleneck_over_mean", "predicted_step_s", "stages", "timeline", "fits_memory"} <= set(chosen)
    assert all(isinstance(x["cost_s"], float) and x["cost_s"] >= 0 for x in report["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["plan", "pipeline.stages=2"]) == 0
    text = capsys.readouterr().out
    assert "partition=flops: boundaries [0, 4, 7]" in text
    assert "bottleneck/mean" in text and "bubble (p-1)/(m+p-1) 0.200" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hardware.memory_gib=0"], "hardware.memory_gib=0.0 is not accepted; expected a number > 0"),
        (
            ["hardware.matmul_efficiency=2"],
            "hardware.matmul_efficiency=2.0 is not accepted; expected a number in (0, 1]",
        ),
        (["--dp", "0"], "--dp=0 is not accepted; expected an integer >= 1"),
        (["pipeline.partition=flops", "hardware.memory_gib=0.0001"], "smallest per-stage cap that would fit is"),
        (["hardware=tpu"], "hardware"),
        (["--device", "gpu"], "--device='gpu' is not accepted; expected cpu, cuda or cuda:N"),
        (["--device", "cuda"], "--device=cuda is not available: this machine has 0 CUDA device(s)"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipefit: error:") and message in err[0]


def test_cli_profile_plan_measures_once_then_reads_the_cache(tmp_path: Path, capsys, monkeypatch) -> None:
    """With --contended on CPU at pp=2 the profile has two ranks busy at once (measured in spawned workers:
    here stood in for by this process) and is cached with its measured transfer and optimizer terms."""
    from dataclasses import asdict

    from pipefit.partition import contended, profile

    calls: list[str] = []
    real = profile.measure_layer

    def quick(skeleton, layers, workload, ranks, runs):
        assert ranks == 2
        calls.extend(layer.kind for layer in layers)
        found = [asdict(real(skeleton, x, workload, "cpu", min_runs=2, max_runs=3, warmup=1)) for x in layers]
        return contended.Measured(found, 1e-4, 2e-8, 1.0, found)  # transfer, optimizer, link GB/s, alone

    monkeypatch.setattr(contended, "_spawn", quick)
    args = ["plan", "pipeline.partition=profile", "data.seq_len=32", "--json", "--cache-dir", str(tmp_path)]
    args.append("--contended")
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cost_model"] == "profile" and set(report["methods"]) == {"profile", "uniform", "parameters"}
    assert calls == ["embed", "block", "norm", "head"]  # llama_tiny's 4 identical blocks timed once
    assert (tmp_path / "profile.json").is_file()
    assert main(args) == 0
    assert len(calls) == 4
    again = json.loads(capsys.readouterr().out)
    assert [x["forward_s"] for x in again["layers"]] == [x["forward_s"] for x in report["layers"]]
    assert again["transfer_s"] == 1e-4
    assert again["layers"][1]["per_step_s"] == pytest.approx(report["layers"][1]["params"] * 2e-8)


def test_cli_profile_plan_measures_on_the_given_device(tmp_path: Path, capsys, monkeypatch) -> None:
    """``--device cuda`` reaches the profiler (and its cache key); the default stays ``cpu``."""
    import torch

    from pipefit.partition import contended, profile

    devices: list[str] = []

    def fake(skeleton, layer, workload, device="cpu", **kw):
        devices.append(device)
        return profile.LayerProfile(forward_s=1e-3, backward_s=2e-3, activation_bytes=1024.0, runs=5, spread=0.0)

    def spawned(skeleton, layers, workload, ranks, runs):  # CPU at pp=2: the contended profile's workers
        from dataclasses import asdict

        return contended.Measured([asdict(fake(skeleton, x, workload, "cpu")) for x in layers], 1e-4, 2e-8, None, [])

    monkeypatch.setattr(profile, "measure_layer", fake)
    monkeypatch.setattr(contended, "_spawn", spawned)
    monkeypatch.setattr(profile, "_device_name", lambda device: device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    base = ["plan", "pipeline.partition=profile", "hardware=h100", "--json", "--cache-dir", str(tmp_path)]
    assert main([*base, "--device", "cuda:1"]) == 0
    assert devices == ["cuda:1"] * 4
    report = json.loads(capsys.readouterr().out)
    assert [x["forward_s"] for x in report["layers"]] == [1e-3] * 7
    assert main(base) == 0
    assert devices == ["cuda:1"] * 4 + ["cpu"] * 4
    assert main([*base, "--device", "cuda:2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pipefit: error: --device=cuda:2 is not available: this machine has 2 CUDA device(s)"
