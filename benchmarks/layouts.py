"""The layout search, measured: every layout of the search space trained on 2 CPU ranks.

    python benchmarks/layouts.py                       # ~10-20 min on 2 CPU cores
    python benchmarks/layouts.py --quick               # tiny shapes, 1-2 min: checks the script runs
    python benchmarks/layouts.py --save benchmarks/results/layouts.txt

A Llama-style model (hidden 256, 4 blocks, vocab 8192, seq 128) and a global batch of 8 sequences:
every layout ``pipefit plan --search --world 2`` considers with ZeRO-1 (pp 1 x dp 2 and pp 2 x dp 1,
every micro-batch size, activation checkpoint interval 0 and 1) is trained by two ranks (gloo, one
thread each) through pipefit's pieces (``Prepared``, ``build_pipeline_module``, ``build_ds_config``,
``deepspeed.initialize``, ``engine.train_batch``), with the split the search gave it. Rounds
alternate the order of the layouts, so drift on a shared machine falls on every layout alike. The
table lists each layout's median step, tokens/s, its ratio to the fastest measured layout and the
search's predicted step and rank; the last line compares the search's pick with the fastest measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
KEYS = ("pp", "dp", "micro_batch_size", "grad_accum_steps", "activation_checkpoint_interval")


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


def ranked_layouts(shape: dict, output_dir: str) -> list[dict]:
    """The search's candidates for 2 ranks (ZeRO-1, intervals 0 and 1), best first."""
    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.partition.search import search_run

    run = validate(compose(overrides(shape, output_dir)))
    return search_run(run, 2, intervals=[0, 1], zero_stages=[1])["candidates"]


def layout_overrides(c: dict) -> list[str]:
    return [
        f"pipeline.stages={c['pp']}",
        f"train.micro_batch_size={c['micro_batch_size']}",
        f"train.grad_accum_steps={c['grad_accum_steps']}",
        f"pipeline.activation_checkpoint_interval={c['activation_checkpoint_interval']}",
        "pipeline.partition=manual",
        f"pipeline.boundaries=[{','.join(map(str, c['boundaries']))}]",
    ]


# --- worker: one of the two ranks ---------------------------------------------------------------


def _time_layout(shape: dict, c: dict, output_dir: str, steps: int) -> float:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.run.ds_config import build_ds_config
    from pipefit.run.engine import build_pipeline_module
    from pipefit.run.preflight import Prepared

    run = validate(compose([*overrides(shape, output_dir), *layout_overrides(c)]))
    prepared = Prepared(run, world_size=2)
    topo = PipeDataParallelTopology(num_pp=c["pp"], num_dp=c["dp"])
    module = build_pipeline_module(
        prepared.skeleton, prepared.boundaries, topo, "cpu", run.pipeline.activation_checkpoint_interval
    )
    # One parameter group on every stage (see benchmarks/partition.py: ZeRO-1's per-group norm).
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        config=build_ds_config(run, prepared.dp, "cpu", None),
        model_parameters=[{"params": list(module.parameters()), "weight_decay": run.optim.weight_decay}],
    )
    if engine.is_first_stage() or engine.is_last_stage():
        engine.set_dataiterator(prepared.batches.iterate(topo.get_coord(dist.get_rank()).data))
    engine.train_batch()  # warm-up: allocations, first communication
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        engine.train_batch()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    del engine, module
    gc.collect()
    return statistics.median(times)


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
    order = list(range(len(layouts)))
    for r in range(args.rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            t = _time_layout(shape, layouts[i], args.output_dir, args.steps)
            measured[i].append(t)
            if rank == 0:
                desc = " ".join(f"{k}={layouts[i][k]}" for k in KEYS)
                print(f"round {r + 1}/{args.rounds} {desc}: {t:.3f} s/step", flush=True)
    if rank == 0:
        Path(args.result).write_text(json.dumps({str(i): v for i, v in measured.items()}))
    dist.barrier()
    dist.destroy_process_group()


# --- parent: search, launch, table --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table(shape: dict, layouts: list[dict], measured: dict[str, list[float]]) -> str:
    tokens = shape["global_batch_size"] * shape["seq_len"]
    med = [statistics.median(measured[str(i)]) for i in range(len(layouts))]
    fastest = min(range(len(layouts)), key=lambda i: med[i])
    rounds = len(measured["0"])
    lines = [
        f"2 CPU ranks x 1 thread; Llama-style hidden {shape['hidden_size']}, {shape['num_hidden_layers']} blocks, "
        f"vocab {shape['vocab_size']}, seq {shape['seq_len']}, global batch {shape['global_batch_size']}, ZeRO-1; "
        f"{rounds} rounds (alternating order), median of per-round medians; predictions: flops, hardware=cpu",
        "",
        f"{'search rank':>11} {'pp':>3} {'dp':>3} {'micro':>5} {'accum':>5} {'ckpt':>4} {'boundaries':<14} "
        f"{'measured':>9} {'tokens/s':>9} {'/fastest':>9} {'predicted':>10} {'measured rank':>13}",
    ]
    by_measured = sorted(range(len(layouts)), key=lambda i: med[i])
    for i, c in enumerate(layouts):
        lines.append(
            f"{i + 1:>11} {c['pp']:>3} {c['dp']:>3} {c['micro_batch_size']:>5} {c['grad_accum_steps']:>5} "
            f"{c['activation_checkpoint_interval']:>4} {str(c['boundaries']):<14} {med[i]:>8.3f}s "
            f"{tokens / med[i]:>9.0f} {med[i] / med[fastest]:>9.3f} {c['predicted_step_s']:>9.3f}s "
            f"{by_measured.index(i) + 1:>13}"
        )
    pick = 0  # the search's best: its first candidate (every layout here fits)
    lines += [
        "",
        f"search's pick (rank 1): {tokens / med[pick]:.0f} tokens/s measured; fastest measured (search rank "
        f"{fastest + 1}): {tokens / med[fastest]:.0f} tokens/s; pick / fastest = {med[fastest] / med[pick]:.3f} "
        f"({'within' if med[fastest] / med[pick] >= 0.95 else 'NOT within'} 5 %)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, measures nothing useful")
    parser.add_argument("--rounds", type=int, default=None, help="passes over every layout (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout per round (default 2; quick 1)")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (1 if args.quick else 2)
    if args.worker:
        worker(args)
        return 0
    shape = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out")
        layouts = [c for c in ranked_layouts(shape, out) if c["fits"]]
        (Path(tmp) / "layouts.json").write_text(json.dumps(layouts))
        result_file = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "plugin")}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(Path(__file__).resolve()),
            "--worker",
            "--layouts",
            str(Path(tmp) / "layouts.json"),
            "--result",
            str(result_file),
            "--output-dir",
            out,
            "--rounds",
            str(args.rounds),
            "--steps",
            str(args.steps),
            *(["--quick"] if args.quick else []),
        ]
        proc = subprocess.run(cmd, env=env, cwd=REPO)
        if proc.returncode != 0:
            print(f"benchmark workers failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        measured = json.loads(result_file.read_text())
    text = table(shape, layouts, measured)
    print(text)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
