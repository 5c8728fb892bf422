"""Partition quality and the plan's predicted step, measured: every pp=2 split of two Llama-style shapes.

    python benchmarks/partition.py                       # both shapes; ~30 min on 2 CPU cores
    python benchmarks/partition.py --shapes 1            # only the first shape; ~12 min
    python benchmarks/partition.py --quick               # tiny shapes, 1-2 min: checks the script runs
    python benchmarks/partition.py --save benchmarks/results/partition.txt   # and partition.json

Two CPU ranks (gloo, one thread each) train a Llama-style model through pipefit's own pieces
(``build_pipeline_module``, ``start_engine``, ``engine.train_batch``: the engine a run trains with): the
issue's shape (hidden 256, 8 blocks, vocab 12288, seq 256, micro-batch 2, 8 micro-batches, ZeRO-1) and a
second one with a small vocabulary and long rows (vocab 4096, seq 512). Every contiguous pp=2 split's engine
is started once and kept; each round times one step of every split, alternating the order, one step of the
single-process baseline, and the contended profile (``pipefit.partition.contended.measure_in_group``: layers
timed with both ranks busy and with the peer idle, the transfer, the optimizer step, the all-reduce), so a
slow minute of a shared machine falls on every variant and on the prices alike. The splits that
``parameters``, ``uniform``, ``flops`` and ``profile`` choose are looked up in the same measurements. It
prints, for each split, the median step time, its ratio to ``parameters`` and to the fastest split, the
prediction of ``pipefit plan --costs profile --contended`` from the median of the rounds' profiles, the same
calibrated by the traced instructions of one split (``--calibrate``), the older quiet-profile and flops
predictions, and measured / 1F1B bound; then the methods' rows; then the single-process baseline (the same
model trained by one process with one thread) against the best pipeline: tokens/s, speedup T_s/T_p and the
ideal p*m/(m+p-1). ``--save`` writes the table and, beside it, every measurement it was made from (.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _bench import fresh_profile_cache, launch_workers, pipefit_engine, save_results, time_steps

FULL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 12288,
    "seq_len": 256,
    "micro_batch_size": 2,
    "micro_batches": 8,
}
# The second shape: a small vocabulary and long rows, so the head is light and the blocks heavy.
LONG = {**FULL, "vocab_size": 4096, "seq_len": 512}  # the embedded tokenizer has 4096 tokens
QUICK = {**FULL, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "vocab_size": 4096}
QUICK.update(seq_len=32, micro_batch_size=2, micro_batches=4)
QUICK_LONG = {**QUICK, "seq_len": 64}
SHAPES = {"full": [FULL, LONG], "quick": [QUICK, QUICK_LONG]}
CONTENDED_RUNS = 6  # timed runs per layer, as pipefit plan --contended


def overrides(shape: dict, output_dir: str) -> list[str]:
    hf = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return [
        "model=llama_tiny",
        *[f"model.hf_config.{k}={shape[k]}" for k in (*hf, "vocab_size")],
        f"data.seq_len={shape['seq_len']}",
        f"train.micro_batch_size={shape['micro_batch_size']}",
        f"train.grad_accum_steps={shape['micro_batches']}",
        "zero.stage=1",
        "pipeline.stages=2",
        "train.export=false",
        "hardware=cpu",
        f"output_dir={output_dir}",
    ]


# --- worker: one of the two ranks ---------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.partition import boundaries, contended, costs
    from pipefit.partition.boundaries import boundaries_for
    from pipefit.partition.plan import evaluate
    from pipefit.run.preflight import Prepared

    torch.set_num_threads(1)
    shape = json.loads(args.shape)
    run = validate(compose(overrides(shape, args.output_dir)))
    prepared = Prepared(run, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    topo = PipeDataParallelTopology(num_pp=2, num_dp=1)
    skeleton, plan = prepared.skeleton, prepared.plan
    n = len(plan)

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    workload = costs.Workload.from_run(run, 1)
    hw = costs.Hardware.from_config(run.hardware)
    priced = {
        "flops": boundaries.price_layers(skeleton, "flops", workload, hw),
        "profile": boundaries.price_layers(
            skeleton, "profile", workload, hw, cache_dir=args.cache_dir, measure=rank == 0, broadcast=broadcast
        ),
    }
    methods = {
        "parameters": boundaries_for(skeleton, "parameters", 2, None),
        "uniform": boundaries_for(skeleton, "uniform", 2, None),
        "flops": boundaries_for(skeleton, "flops", 2, None, layer_costs=priced["flops"]),
        "profile": boundaries_for(skeleton, "profile", 2, None, layer_costs=priced["profile"]),
    }
    splits = [[0, b, n] for b in range(1, n)]
    # Every split's engine stays alive (one warm-up step each), and each round times one pass over all of
    # them, alternating the order, and the single-process baseline on rank 0: a slow minute of this shared
    # machine then falls on every variant of the round alike instead of on a few splits.
    engines = {}
    for bounds in splits:
        engines[str(bounds)] = engine = pipefit_engine(prepared, bounds, topo)
        engine.train_batch()
    single = single_process(shape, args.output_dir + "-single") if rank == 0 and not args.no_single else None
    measured: dict[str, list[float]] = {str(s): [] for s in splits}
    spans: dict[str, list[dict[str, float]]] = {str(s): [] for s in splits}
    single_times: list[float] = []
    distinct = list(contended.distinct_layers(skeleton, plan).values())
    profiles: list = []
    for r in range(args.rounds):
        for bounds in splits if r % 2 == 0 else splits[::-1]:
            t, found = time_steps(engines[str(bounds)], args.steps, warm_up=False)
            measured[str(bounds)].append(t)
            spans[str(bounds)].append(found)
            if rank == 0:
                print(f"round {r + 1}/{args.rounds} split {bounds}: {t:.3f} s/step", flush=True)
        if single is not None:
            single_times.append(single(args.steps))
            print(f"round {r + 1}/{args.rounds} single process: {single_times[-1]:.3f} s/step", flush=True)
        dist.barrier()
        # The contended profile, measured in every round between the steps it predicts: one snapshot taken
        # before or after ten minutes of steps meets a machine 10-30 % faster or slower than they did.
        here = contended.measure_in_group(skeleton, distinct, workload, CONTENDED_RUNS)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, here)
        profiles.append(contended.combine(every))
    engines.clear()
    gc.collect()
    if rank == 0:
        prof = priced["profile"]
        rows = {}
        for bounds in splits:
            ev = evaluate(prof, plan, bounds)
            fb = [st["forward_s"] + st["backward_s"] for st in ev["stages"]]
            rows[str(bounds)] = {
                "boundaries": bounds,
                "times": measured[str(bounds)],
                "instruction_s": spans[str(bounds)],
                "predicted_profile_s": ev["predicted_step_s"],
                "predicted_flops_s": evaluate(priced["flops"], plan, bounds)["predicted_step_s"],
                "bound_1f1b_s": (workload.micro_batches + 1) * max(fb),
            }
        tokens = workload.micro_batches * workload.micro_batch_size * workload.seq_len
        found = {"shape": shape, "methods": methods, "splits": rows, "tokens_per_step": tokens}
        found["single_s"] = statistics.median(single_times) if single_times else None
        found["contended_rounds"] = [x._asdict() for x in profiles]
        Path(args.result).write_text(json.dumps(found, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# --- parent: single-process baseline, launch, table -------------------------------------------


def single_process(shape: dict, output_dir: str):
    """A timer of the same model trained by one process with one thread (pipefit.parity.reference), warmed
    up: ``timer(steps)`` trains ``steps`` optimizer steps and returns their median seconds."""
    from transformers import AutoModelForCausalLM

    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.parity import reference
    from pipefit.run.preflight import Prepared

    run = validate(compose([*overrides(shape, output_dir), "pipeline.stages=1"]))
    prepared = Prepared(run, world_size=1)
    model = AutoModelForCausalLM.from_config(prepared.hf_config)
    reference.train_reference(model, run, prepared.batches, 1)  # warm-up

    def timer(steps: int) -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            reference.train_reference(model, run, prepared.batches, 1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timer


def measure_profile(shape: dict, output_dir: str, cache_dir: str) -> None:
    """Fill the profile cache in this process (one thread, nothing else of ours running).

    Rank 0 of the workers then finds every layer in the cache and broadcasts it: measuring inside
    the worker would time layers while the other rank's process competes for the same two cores.
    """
    import torch

    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.model.hf import load_hf_config
    from pipefit.model.layer_list import layer_plan, make_skeleton
    from pipefit.partition import costs, profile

    torch.set_num_threads(1)
    run = validate(compose(overrides(shape, output_dir)))
    hf_config = load_hf_config(run.model.path, dict(run.model.hf_config))
    hf_config._attn_implementation = run.model.attn_implementation
    skeleton = make_skeleton(hf_config, seed=run.train.seed)
    profile.profile_layers(skeleton, layer_plan(skeleton), costs.Workload.from_run(run, 1), cache_dir=cache_dir)


def contended_predictions(shape: dict, output_dir: str, result: dict) -> None:
    """``pipefit plan --costs profile --contended``'s predicted step for every split (layers timed with both
    ranks busy and with the peer idle, measured transfers and optimizer work: ``pipefit.partition.contended``),
    from the median of the contended profiles the workers measured in every round, and the same prices
    calibrated (``--calibrate``) by the measured instructions of one split: the one ``profile`` chose, the
    layout a user would launch and trace. Adds both to ``result["splits"]``."""
    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.partition import calibrate, contended, costs
    from pipefit.partition.plan import evaluate, settled
    from pipefit.run.preflight import Prepared

    run = validate(compose(overrides(shape, output_dir)))
    prepared = Prepared(run, world_size=2)
    hw = costs.Hardware.from_config(run.hardware)
    rounds_measured = [contended.Measured(**x) for x in result["contended_rounds"]]
    measured_profile = contended.contended_profile(
        prepared.skeleton, prepared.plan, contended.over_rounds(rounds_measured), ranks=2
    )
    workload = costs.Workload.from_run(run, 1)
    priced = contended.contended_costs(prepared.hf_config, prepared.plan, workload, hw, measured_profile)
    source = result["methods"]["profile"]
    rounds = result["splits"][str(source)]["instruction_s"]
    measured = {
        int(stage): {name: statistics.median(r[stage].get(name, 0.0) for r in rounds) for name in rounds[0][stage]}
        for stage in rounds[0]
    }
    ran, alone = settled(priced, prepared.plan, source)  # the prices as the measured split ran (contention)
    calibrated = calibrate.apply(priced, calibrate.fit(ran, source, measured, source=str(source), alone=alone))
    result["calibrated_by"] = source
    result["calibration"] = calibrated.details["calibration"]
    busy = {"alone_forward_s": [], "alone_backward_s": []}  # every rank priced busy for the whole step
    variants = {
        "predicted_contended_s": priced,
        "predicted_calibrated_s": calibrated,
        "predicted_busy_s": replace(priced, **busy),
        "predicted_calibrated_busy_s": replace(calibrated, **busy),
    }
    for row in result["splits"].values():
        for field, prices in variants.items():
            row[field] = evaluate(prices, prepared.plan, row["boundaries"])["predicted_step_s"]


def table(result: dict, single_s: float | None) -> str:
    rows = result["splits"]
    med = {k: statistics.median(v["times"]) for k, v in rows.items()}
    fastest = min(med, key=med.get)
    params = str(result["methods"]["parameters"])
    shape = result["shape"]
    m = shape["micro_batches"]
    lines = [
        f"pp=2, 2 CPU ranks x 1 thread; Llama-style hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} blocks, "
        f"vocab {shape['vocab_size']}, seq {shape['seq_len']}, micro-batch {shape['micro_batch_size']}, "
        f"{m} micro-batches, ZeRO-1; {len(next(iter(rows.values()))['times'])} rounds (alternating order), "
        "median over rounds (every engine alive, one pass over all splits per round)",
        "",
        "pred(calibrated): pipefit plan --costs profile --contended --calibrate, the ratios measured on the split",
        f"  marked * ({result['calibrated_by']}: profile's choice) applied to every split: "
        + ", ".join(f"{k} x{v:.3f}" for k, v in result["calibration"].items() if k != "source"),
        "pred(contended): --costs profile --contended alone, measured in every round between the steps (median):",
        "  layers timed with both ranks busy and with the peer idle, each stage priced between the two by its",
        "  peer's busy share; measured transfers, optimizer step",
        "pred(quiet): layers timed one at a time, alone (the profile before); pred(flops): analytic",
        "",
        f"{'split':<14} {'measured':>9} {'/params':>8} {'/fastest':>9} {'pred(calib.)':>12} {'pred/meas':>10} "
        f"{'pred(cont.)':>11} {'pred/meas':>10} {'pred(quiet)':>12} {'pred/meas':>10} {'pred(flops)':>12} "
        f"{'meas/1F1B bound':>16}  chosen by",
    ]
    for key, v in rows.items():
        by = [name for name, b in result["methods"].items() if str(b) == key]
        cal, cont = v["predicted_calibrated_s"], v["predicted_contended_s"]
        mark = "*" if key == str(result["calibrated_by"]) else " "
        lines.append(
            f"{key + mark:<14} {med[key]:>8.3f}s {med[key] / med[params]:>8.3f} {med[key] / med[fastest]:>9.3f} "
            f"{cal:>11.3f}s {cal / med[key]:>10.3f} {cont:>10.3f}s {cont / med[key]:>10.3f} "
            f"{v['predicted_profile_s']:>11.3f}s {v['predicted_profile_s'] / med[key]:>10.3f} "
            f"{v['predicted_flops_s']:>11.3f}s {med[key] / v['bound_1f1b_s']:>16.3f}  {', '.join(by)}"
        )
    for name, field in (
        ("pred(calibrated)", "predicted_calibrated_s"),
        ("pred(contended)", "predicted_contended_s"),
        ("  the same, every rank priced busy all step: pred(calibrated)", "predicted_calibrated_busy_s"),
        ("  the same, every rank priced busy all step: pred(contended)", "predicted_busy_s"),
    ):
        ratios = [v[field] / med[k] for k, v in rows.items()]
        worst = max(abs(r - 1) for r in ratios)
        within = sum(abs(r - 1) <= 0.10 for r in ratios)
        lines.append(
            f"{name}/measured: {min(ratios):.3f}-{max(ratios):.3f}, worst {worst:.1%} off, "
            f"{within} of {len(ratios)} splits within 10 %"
        )
    lines += ["", f"{'method':<12} {'split':<14} {'measured':>9} {'vs parameters':>14} {'vs fastest':>11}"]
    for name, b in result["methods"].items():
        k = str(b)
        lines.append(f"{name:<12} {k:<14} {med[k]:>8.3f}s {med[k] / med[params]:>14.3f} {med[k] / med[fastest]:>11.3f}")
    lines.append(f"{'fastest':<12} {fastest:<14} {med[fastest]:>8.3f}s {med[fastest] / med[params]:>14.3f} {1:>11.3f}")
    if single_s is not None:
        tokens = result["tokens_per_step"]
        best = med[fastest]
        lines += [
            "",
            f"single process (1 thread): {single_s:.3f} s/step, {tokens / single_s:.0f} tokens/s; "
            f"best pp=2: {best:.3f} s/step, {tokens / best:.0f} tokens/s; speedup T_s/T_p {single_s / best:.2f} "
            f"(ideal p*m/(m+p-1) = {2 * m / (m + 1):.2f}; {single_s / best / (2 * m / (m + 1)):.2f} of ideal)",
        ]
    return "\n".join(lines)


def measure_shape(args: argparse.Namespace, shape: dict) -> dict | None:
    """Every pp=2 split of one shape timed by two worker ranks, predicted, and the single-process baseline:
    the measurements (each round's step and instruction seconds, each round's contended profile)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        measure_profile(shape, str(Path(tmp) / "profile"), str(Path(tmp) / "cache"))
        worker_args = ["--result", str(result_file), "--output-dir", str(Path(tmp) / "out")]
        worker_args += ["--cache-dir", str(Path(tmp) / "cache"), "--rounds", str(args.rounds)]
        worker_args += ["--no-single"] if args.no_single else []
        if launch_workers(__file__, [*worker_args, "--steps", str(args.steps), "--shape", json.dumps(shape)]) != 0:
            return None
        result = json.loads(result_file.read_text())
        contended_predictions(shape, str(Path(tmp) / "plan"), result)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, measures nothing useful")
    parser.add_argument("--rounds", type=int, default=None, help="passes over every split (default 8; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per split per round (default 1)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-process baseline")
    parser.add_argument("--save", default=None, help="also write the table to this file (and the measurements, .json)")
    parser.add_argument("--shapes", type=int, nargs="+", choices=(1, 2), help="only these shapes (default both)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 8)
    args.steps = args.steps or 1
    if args.worker:
        worker(args)
        return 0
    with fresh_profile_cache():
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    texts, results = [], []
    shapes = SHAPES["quick" if args.quick else "full"]
    for shape in [shapes[i - 1] for i in args.shapes] if args.shapes else shapes:
        result = measure_shape(args, shape)
        if result is None:
            return 1
        results.append(result)
        texts.append(table(result, result["single_s"]))
        print(texts[-1], flush=True)
    save_results(args.save, "\n\n".join(texts), results)  # the table, and every measurement beside it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
