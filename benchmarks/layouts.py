"""The layout search, measured: every layout of the search space trained on 2 CPU ranks.

    python benchmarks/layouts.py                       # ~10-20 min on 2 CPU cores
    python benchmarks/layouts.py --quick               # tiny shapes, 1-2 min: checks the script runs
    python benchmarks/layouts.py --save benchmarks/results/layouts.txt

A Llama-style model (hidden 256, 4 blocks, vocab 8192, seq 128) and a global batch of 8 sequences:
every layout ``pipefit plan --search --world 2`` considers with ZeRO-1 (pp 1 x dp 2 and pp 2 x dp 1,
every micro-batch size, activation checkpoint interval 0 and 1, schedules 1f1b and zb1p) is trained by
two ranks (gloo, one thread each) with the engine a run trains with (``Prepared``,
``build_pipeline_module``, ``start_engine``, ``engine.train_batch``: pipefit's ``PipelineEngine``), with
the split the search gave it. Rounds alternate the order of the layouts, so drift on a shared machine
falls on every layout alike.

Three searches rank the same layouts: ``flops`` (the analytic model), ``profile`` (``--costs profile
--contended``: each micro-batch shape timed with both ranks busy) and ``calibrated`` (the same, with
``--calibrate``: the ratios of measured to priced seconds of one layout, profile's pick, the one a user
would launch and trace first). The table lists each layout's median step, tokens/s, its ratio to the
fastest measured layout and each search's predicted step and rank; the last lines compare each search's
pick with the fastest measured layout.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
from pathlib import Path

from _bench import fresh_profile_cache, launch_workers, pipefit_engine, save_results, time_steps

FULL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 8192,
    "seq_len": 128,
    "global_batch_size": 8,
}
QUICK = {**FULL, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 4096}
QUICK.update(seq_len=32, global_batch_size=4)
KEYS = ("pp", "dp", "micro_batch_size", "grad_accum_steps", "activation_checkpoint_interval", "schedule")


def overrides(shape: dict, output_dir: str) -> list[str]:
    hf = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return [
        "model=llama_tiny",
        *[f"model.hf_config.{k}={shape[k]}" for k in (*hf, "vocab_size")],
        f"data.seq_len={shape['seq_len']}",
        f"train.global_batch_size={shape['global_batch_size']}",
        "zero.stage=1",
        "train.export=false",
        "hardware=cpu",
        f"output_dir={output_dir}",
    ]


def ranked_layouts(shape: dict, output_dir: str, **priced) -> list[dict]:
    """The search's candidates for 2 ranks (ZeRO-1, intervals 0 and 1), best first; ``priced``: how the
    search prices (``costs_model``, ``contended``, ``calibration``; default the ``flops`` model)."""
    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.partition.search import search_run

    run = validate(compose(overrides(shape, output_dir)))
    return search_run(run, 2, intervals=[0, 1], zero_stages=[1], **priced)["candidates"]


def calibration_from(shape: dict, output_dir: str, layout: dict, rounds: list[dict]) -> object:
    """``pipefit plan --calibrate``'s ratios from one measured layout (its instructions' medians over rounds)."""
    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.model.layer_list import layer_plan
    from pipefit.partition import calibrate
    from pipefit.partition.plan import price_run, settled

    run = validate(compose([*overrides(shape, output_dir), *layout_overrides(layout)]))
    skeleton, costs, _ = price_run(run, layout["dp"], costs_model="profile", contended=True)
    costs, alone = settled(costs, layer_plan(skeleton), layout["boundaries"])  # as that layout ran (contention)
    measured = {
        int(stage): {name: statistics.median(r[stage].get(name, 0.0) for r in rounds) for name in rounds[0][stage]}
        for stage in rounds[0]
    }
    return calibrate.fit(costs, layout["boundaries"], measured, source=describe(layout), alone=alone)


def key(c: dict) -> tuple:
    return (*(c[k] for k in KEYS), tuple(c["boundaries"]))


def describe(c: dict) -> str:
    return " ".join(f"{k}={c[k]}" for k in KEYS) + f" {c['boundaries']}"


def layout_overrides(c: dict) -> list[str]:
    return [
        f"pipeline.stages={c['pp']}",
        f"train.micro_batch_size={c['micro_batch_size']}",
        f"train.grad_accum_steps={c['grad_accum_steps']}",
        f"pipeline.activation_checkpoint_interval={c['activation_checkpoint_interval']}",
        f"pipeline.schedule={c['schedule']}",
        "pipeline.partition=manual",
        f"pipeline.boundaries=[{','.join(map(str, c['boundaries']))}]",
    ]


# --- worker: one of the two ranks ---------------------------------------------------------------


def _start_layout(shape: dict, c: dict, output_dir: str):
    """This rank's engine for layout ``c``, started as a run starts it, after one warm-up step."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.run.preflight import Prepared

    run = validate(compose([*overrides(shape, output_dir), *layout_overrides(c)]))
    prepared = Prepared(run, world_size=2)
    engine = pipefit_engine(prepared, prepared.boundaries, PipeDataParallelTopology(num_pp=c["pp"], num_dp=c["dp"]))
    engine.train_batch()
    return engine


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    shape = QUICK if args.quick else FULL
    layouts = json.loads(Path(args.layouts).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    measured: dict[int, list[float]] = {i: [] for i in range(len(layouts))}
    instructions: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(layouts))}
    order = list(range(len(layouts)))
    # Every layout's engine stays alive and each round times one pass over all of them, alternating the
    # order: a slow minute of this shared machine then falls on every layout of the round alike.
    engines = [_start_layout(shape, c, args.output_dir) for c in layouts]
    for r in range(args.rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            t, spans = time_steps(engines[i], args.steps, warm_up=False)
            measured[i].append(t)
            instructions[i].append(spans)
            if rank == 0:
                desc = " ".join(f"{k}={layouts[i][k]}" for k in KEYS)
                print(f"round {r + 1}/{args.rounds} {desc}: {t:.3f} s/step", flush=True)
    engines.clear()
    gc.collect()
    if rank == 0:
        Path(args.result).write_text(json.dumps({str(i): v for i, v in measured.items()}))
        Path(args.result).with_suffix(".spans.json").write_text(json.dumps(instructions))
    dist.barrier()
    dist.destroy_process_group()


# --- parent: search, launch, table --------------------------------------------------------------


def table(shape: dict, layouts: list[dict], measured: dict[str, list[float]], searches: dict[str, list]) -> str:
    """Every measured layout (in the calibrated search's order) with each search's prediction and rank,
    then each search's pick against the fastest measured layout."""
    tokens = shape["global_batch_size"] * shape["seq_len"]
    index = {key(c): i for i, c in enumerate(layouts)}
    med = [statistics.median(measured[str(i)]) for i in range(len(layouts))]
    fastest = min(range(len(layouts)), key=lambda i: med[i])
    by_measured = sorted(range(len(layouts)), key=lambda i: med[i])
    ranks = {
        name: {key(c)[:-1]: (r + 1, c["predicted_step_s"], c["boundaries"]) for r, c in enumerate(found)}
        for name, found in searches.items()
    }  # by layout: a search that splits a layout elsewhere predicts its own split (marked +)
    lines = [
        f"2 CPU ranks x 1 thread; Llama-style hidden {shape['hidden_size']}, {shape['num_hidden_layers']} blocks, "
        f"vocab {shape['vocab_size']}, seq {shape['seq_len']}, global batch {shape['global_batch_size']}, ZeRO-1; "
        f"{len(measured['0'])} rounds (alternating order, every engine alive), median over rounds; hardware=cpu",
        "searches: flops = pipefit plan --search; profile = --costs profile --contended; calibrated = the same",
        "  with --calibrate from the measured instructions of profile's pick (the layout one would launch first)",
        "",
        f"{'pp':>3} {'dp':>3} {'micro':>5} {'accum':>5} {'ckpt':>4} {'sched':>5} {'boundaries':<12} {'measured':>9} "
        f"{'tokens/s':>9} {'/fastest':>9} {'rank':>4}"
        + "".join(f" {name + ' pred':>16} {'rank':>4}" for name in searches),
    ]
    for c in searches["calibrated"]:
        i = index.get(key(c))
        if i is None:
            continue
        row = (
            f"{c['pp']:>3} {c['dp']:>3} {c['micro_batch_size']:>5} {c['grad_accum_steps']:>5} "
            f"{c['activation_checkpoint_interval']:>4} {c['schedule']:>5} {str(c['boundaries']):<12} {med[i]:>8.3f}s "
            f"{tokens / med[i]:>9.0f} {med[i] / med[fastest]:>9.3f} {by_measured.index(i) + 1:>4}"
        )
        for name in searches:
            rank, pred, bounds = ranks[name].get(key(c)[:-1], (0, float("nan"), c["boundaries"]))
            row += f" {pred:>15.3f}{'+' if bounds != c['boundaries'] else 's'} {rank:>4}"
        lines.append(row)
    lines += ["", "+: that search splits this layout elsewhere; its prediction is for its own split", ""]
    for name, found in searches.items():
        pick = index.get(key(found[0]))
        if pick is None:
            lines.append(f"{name} search's pick {describe(found[0])} was not measured")
            continue
        ratio = med[fastest] / med[pick]
        lines.append(
            f"{name} search's pick ({describe(found[0])}): {tokens / med[pick]:.0f} tokens/s measured; fastest "
            f"measured: {tokens / med[fastest]:.0f} tokens/s; pick / fastest = {ratio:.3f} "
            f"({'within' if ratio >= 0.95 else 'NOT within'} 5 %)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, measures nothing useful")
    parser.add_argument("--rounds", type=int, default=None, help="passes over every layout (default 6; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout per round (default 1)")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 6)
    args.steps = args.steps or 1
    if args.worker:
        worker(args)
        return 0
    with fresh_profile_cache():
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    shape = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out")
        searches = {
            "flops": ranked_layouts(shape, out),
            "profile": ranked_layouts(shape, out, costs_model="profile", contended=True),
        }
        layouts = [c for c in searches["profile"] if c["fits"]]
        (Path(tmp) / "layouts.json").write_text(json.dumps(layouts))
        result_file = Path(tmp) / "result.json"
        worker_args = ["--layouts", str(Path(tmp) / "layouts.json"), "--result", str(result_file)]
        worker_args += ["--output-dir", out, "--rounds", str(args.rounds), "--steps", str(args.steps)]
        code = launch_workers(__file__, worker_args + (["--quick"] if args.quick else []))
        if code != 0:
            return code
        measured = json.loads(result_file.read_text())
        spans = json.loads(result_file.with_suffix(".spans.json").read_text())
        cal = calibration_from(shape, out, layouts[0], spans["0"])
        searches["calibrated"] = ranked_layouts(shape, out, costs_model="profile", contended=True, calibration=cal)
    text = table(shape, layouts, measured, searches)
    text += "\ncalibration (measured / priced on the profile pick): " + ", ".join(
        f"{k} x{getattr(cal, k):.3f}" for k in ("forward", "backward", "optimizer", "reduce")
    )
    print(text)
    detail = {"layouts": layouts, "measured": measured, "instruction_s": spans, "searches": searches}
    save_results(args.save, text, detail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
