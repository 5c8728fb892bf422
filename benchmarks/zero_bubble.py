"""Zero-bubble (``pipeline.schedule=zb1p``) against 1F1B, measured side by side on the partition model.

    python benchmarks/zero_bubble.py                     # pp=2 m=4, pp=2 m=8, pp=4 m=8; ~15-25 min on 2 cores
    python benchmarks/zero_bubble.py --quick             # tiny shapes, 1-2 min: checks the script runs
    python benchmarks/zero_bubble.py --save benchmarks/results/zero_bubble.txt

The model is ``benchmarks/partition.py``'s (Llama-style, hidden 256, 8 blocks, vocab 12288, seq 256,
micro-batch 2, ZeRO-1), split by pipefit's ``flops`` partition. For each (stages, micro-batches)
one set of ranks (gloo, one thread each) builds two engines through pipefit's own pieces, one per
schedule, and times ``train_batch`` in rounds that alternate which schedule goes first, so drift on
a shared machine falls on both alike. It prints the median step of each, the ratio zb1p / 1f1b
(target at pp=2, m=4: <= 0.96; 1F1B's bubble there is (p-1)/(m+p-1) = 1/5), the per-round ratios,
and per stage the peak bytes of activations saved for backward (autograd's saved tensors, counted
once per storage) under each schedule, with the W queue's peak (inputs and output gradients held
for the deferred weight GEMMs) shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _bench import free_port as _free_port  # noqa: E402
from _bench import save_results  # noqa: E402

from partition import FULL, QUICK  # noqa: E402  (the model of benchmarks/partition.py)
from partition import overrides as partition_overrides  # noqa: E402

SCHEDULES = ("zb1p", "1f1b")
FULL_CASES = [(2, 4), (2, 8), (4, 8)]
QUICK_CASES = [(2, 4), (4, 4)]


class SavedBytes:
    """Bytes of tensors autograd holds for backward (parameters and views of them excluded, each storage once)."""

    def __init__(self, params: list) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, holders]
        self.params = {p.untyped_storage().data_ptr() for p in params}

    def now(self) -> int:
        return sum(b for b, _ in self.live.values())

    def hooks(self):
        import torch

        meter = self

        class Holder:
            def __init__(self, t: torch.Tensor) -> None:
                self.t, self.ptr = t, t.untyped_storage().data_ptr()
                entry = meter.live.setdefault(self.ptr, [t.untyped_storage().nbytes(), 0])
                entry[1] += 1

            def __del__(self) -> None:
                entry = meter.live.get(self.ptr)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del meter.live[self.ptr]

        def pack(t: torch.Tensor):
            return t if t.untyped_storage().data_ptr() in meter.params else Holder(t)

        def unpack(h):
            return h if isinstance(h, torch.Tensor) else h.t

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _engine(prepared, topo, schedule: str):
    import deepspeed

    from pipefit.run.ds_config import build_ds_config
    from pipefit.run.engine import build_pipeline_module, install_single_collective_grad_norm
    from pipefit.run.pipe_engine import adopt

    module = build_pipeline_module(prepared.skeleton, prepared.boundaries, topo, "cpu")
    # One parameter group on every stage (see benchmarks/partition.py).
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        config=build_ds_config(prepared.run, 1, "cpu", None),
        model_parameters=[{"params": list(module.parameters()), "weight_decay": prepared.run.optim.weight_decay}],
    )
    adopt(engine)
    engine.use_schedule(schedule)
    install_single_collective_grad_norm(engine)
    if engine.is_first_stage() or engine.is_last_stage():
        engine.set_dataiterator(prepared.batches.iterate(0))
    return engine


def _memory(engine) -> dict[str, int]:
    """One step with saved tensors counted at every instruction: peaks of autograd's and the W queue's."""
    meter, peaks = SavedBytes(list(engine.module.parameters())), {"saved": 0, "w_queue": 0, "total": 0}
    run_instruction = engine._run_instruction

    def counted(cmd) -> None:  # this engine instance only
        run_instruction(cmd)
        saved = meter.now()
        queued = engine.weight_grads.saved_bytes() if engine.weight_grads is not None else 0
        peaks.update(
            saved=max(peaks["saved"], saved),
            w_queue=max(peaks["w_queue"], queued),
            total=max(peaks["total"], saved + queued),
        )

    engine._run_instruction = counted
    with meter.hooks():
        engine.train_batch()
    del engine._run_instruction
    return peaks


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.run.preflight import Prepared

    torch.set_num_threads(1)
    shape = {**(QUICK if args.quick else FULL), "micro_batches": args.micro_batches}
    run = validate(compose([*partition_overrides(shape, args.output_dir), f"pipeline.stages={args.stages}"]))
    prepared = Prepared(run, world_size=args.stages)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    topo = PipeDataParallelTopology(num_pp=args.stages, num_dp=1)
    engines = {s: _engine(prepared, topo, s) for s in SCHEDULES}
    memory = {s: _memory(engines[s]) for s in SCHEDULES}  # also the warm-up step
    times: dict[str, list[float]] = {s: [] for s in SCHEDULES}
    for r in range(args.rounds):
        for s in SCHEDULES if r % 2 == 0 else SCHEDULES[::-1]:
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                engines[s].train_batch()
                dist.barrier()
                times[s].append(time.perf_counter() - t0)
        if rank == 0:
            print(f"pp={args.stages} m={args.micro_batches} round {r + 1}/{args.rounds} done", flush=True)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, memory)
    if rank == 0:
        result = {"stages": args.stages, "micro_batches": args.micro_batches, "times": times, "memory": gathered}
        Path(args.result).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def table(results: list[dict]) -> str:
    lines = [
        "zb1p vs 1f1b, median step (s) over alternating rounds; ratio < 1: zero-bubble is faster",
        f"{'pp':>3} {'m':>3} {'1f1b_s':>8} {'zb1p_s':>8} {'ratio':>6} {'1F1B bubble':>11}  per-round ratios",
    ]
    for r in results:
        p, m, t = r["stages"], r["micro_batches"], r["times"]
        a, z = statistics.median(t["1f1b"]), statistics.median(t["zb1p"])
        per = " ".join(f"{x / y:.3f}" for x, y in zip(t["zb1p"], t["1f1b"], strict=True))
        lines.append(f"{p:>3} {m:>3} {a:8.3f} {z:8.3f} {z / a:6.3f} {(p - 1) / (m + p - 1):11.3f}  {per}")
    lines += ["", "saved-for-backward bytes per stage, peak over one step (MiB)"]
    lines.append(f"{'pp':>3} {'m':>3} {'stage':>5} {'1f1b':>8} {'zb1p':>8} {'W queue':>8} {'zb1p+W':>8}")
    mib = 2**20
    for r in results:
        for stage, mem in enumerate(r["memory"]):
            one, zb = mem["1f1b"], mem["zb1p"]
            lines.append(
                f"{r['stages']:>3} {r['micro_batches']:>3} {stage:>5} {one['saved'] / mib:8.2f} "
                f"{zb['saved'] / mib:8.2f} {zb['w_queue'] / mib:8.2f} {zb['total'] / mib:8.2f}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of (zb1p, 1f1b), alternating (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per schedule per round (default 2)")
    parser.add_argument("--cases", nargs="*", default=None, help="STAGESxMICRO_BATCHES, e.g. 2x4 (default: all)")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batches", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.steps = args.steps or (1 if args.quick else 2)
    if args.worker:
        worker(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [tuple(int(x) for x in c.split("x")) for c in args.cases] if args.cases else None
        for stages, micro_batches in cases or (QUICK_CASES if args.quick else FULL_CASES):
            result_file = Path(tmp) / f"pp{stages}_m{micro_batches}.json"
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": f"{REPO / 'plugin'}{os.pathsep}{REPO / 'benchmarks'}",
            }
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(stages),
                "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker",
                "--stages", str(stages), "--micro-batches", str(micro_batches), "--result", str(result_file),
                "--output-dir", str(Path(tmp) / "out"), "--rounds", str(args.rounds), "--steps", str(args.steps),
                *(["--quick"] if args.quick else []),
            ]  # fmt: skip
            proc = subprocess.run(cmd, env=env, cwd=REPO)
            if proc.returncode != 0:
                print(
                    f"benchmark workers failed at pp={stages} m={micro_batches} (exit {proc.returncode})",
                    file=sys.stderr,
                )
                return proc.returncode
            results.append(json.loads(result_file.read_text()))
    text = table(results)
    print(text)
    save_results(args.save, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
