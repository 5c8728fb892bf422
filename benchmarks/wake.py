"""What a layer costs right after its stage waited for its peer, against back to back with the peer busy.

    python benchmarks/wake.py                          # both shapes of benchmarks/partition.py; ~2 min
    python benchmarks/wake.py --save benchmarks/results/wake.txt

The partition benchmark's saved measurements (``benchmarks/results/partition.json``) show the lighter stage
of a pp=2 split, which computes, waits for its busier peer, computes, spending 1.15-1.4x its contended price
per forward and backward on a busy machine, and the heavier stage about 1x. The cost model prices a stage by
how busy its peer is, not by how often the stage itself stops and starts. This benchmark isolates the second
effect on two CPU ranks (gloo, one thread each), for a block and for the LM head of each shape:

- ``back to back``: both ranks run the layer's forward and backward over and over; rank 0's runs are timed
  (the contended profile's price);
- ``after k``: rank 1 runs the layer ``k`` times and then sends rank 0 a one-element tensor, which rank 0
  waits for in a blocking gloo ``recv`` (as a pipeline stage waits for its input) before its timed run;
  rank 1 goes on with its next ``k`` runs meanwhile, so rank 0's run also has its peer busy.

Variants alternate within every round; the table gives the median over rounds of each variant's median
run and its ratio to ``back to back``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _bench import launch_workers, save_results

from partition import FULL, LONG, QUICK, overrides

WAITS = (1, 2, 4)  # the peer's runs per wait


def layer_step(shape: dict, kind: str):
    """One forward and backward of the shape's first block or its LM head, exactly as the profile times it
    (``pipefit.partition.profile.layer_pass``): a callable returning its seconds."""
    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.partition.costs import Workload
    from pipefit.partition.profile import layer_pass
    from pipefit.run.preflight import Prepared

    with tempfile.TemporaryDirectory(prefix="pipefit-wake-") as tmp:
        run = validate(compose(overrides(shape, str(Path(tmp) / "out"))))
        prepared = Prepared(run, world_size=2)
    layer = next(x for x in prepared.plan if x.kind == kind)
    once = layer_pass(prepared.skeleton, layer, Workload.from_run(run, 1))

    def step() -> float:
        return sum(once(None))

    for _ in range(2):
        step()
    return step


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    token = torch.zeros(1)
    found: dict[str, dict[str, list[float]]] = {}
    for name, shape in json.loads(args.shapes).items():
        for kind in ("block", "head"):
            step = layer_step(shape, kind)
            rows = found.setdefault(f"{name} {kind}", {"back to back": [], **{f"after {k}": [] for k in WAITS}})
            variants = list(rows)
            for r in range(args.rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    times = []
                    dist.barrier()
                    for _ in range(args.runs):
                        if variant == "back to back":
                            times.append(step())
                        elif rank == 1:
                            for _ in range(int(variant.split()[1])):
                                step()
                            dist.send(token, 0)
                        else:
                            dist.recv(token, 1)
                            times.append(step())
                    if rank == 1 and variant != "back to back":
                        step()  # keeps rank 0's last run company
                    if rank == 0:
                        rows[variant].append(statistics.median(times))
    if rank == 0:
        Path(args.result).write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()


def table(found: dict, rounds: int, runs: int) -> str:
    lines = [
        "2 CPU ranks x 1 thread (gloo); one forward + backward of a layer of benchmarks/partition.py's shapes, "
        f"micro-batch 2; {rounds} rounds x {runs} runs, variants alternating; median of the rounds' medians",
        "back to back: both ranks run the layer continuously (rank 0 timed); after k: rank 0 waits in a gloo recv "
        "while its peer runs the layer k times, then runs it once (the peer busy again)",
        "",
        f"{'layer':<16} {'back to back':>13} " + " ".join(f"{'after ' + str(k):>16}" for k in WAITS),
    ]
    for layer, rows in found.items():
        base = statistics.median(rows["back to back"])
        after = {k: statistics.median(rows[f"after {k}"]) for k in WAITS}
        cells = [f"{1000 * t:7.1f} ms {t / base:5.3f}" for t in after.values()]
        lines.append(f"{layer:<16} {1000 * base:10.1f} ms " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny shape: checks the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every variant (default 6; quick 1)")
    parser.add_argument("--runs", type=int, default=8, help="timed runs per variant per round")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 6)
    if args.worker:
        worker(args)
        return 0
    shapes = {"quick": QUICK} if args.quick else {"shape 1": FULL, "shape 2": LONG}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        common = ["--result", str(result), "--rounds", str(args.rounds), "--runs", str(args.runs)]
        if launch_workers(__file__, [*common, "--shapes", json.dumps(shapes)]) != 0:
            return 1
        text = table(json.loads(result.read_text()), args.rounds, args.runs)
    print(text)
    save_results(args.save, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
