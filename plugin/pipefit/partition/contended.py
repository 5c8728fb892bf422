"""The ``profile`` cost model measured the way a pipeline runs: every rank busy at the same time.

Layers timed one at a time on a quiet machine miss what a real step adds (measured: predicted/measured
0.74-0.99 on two CPU ranks). :func:`measure_contended` starts ``ranks`` processes (one thread each, gloo)
that time every distinct layer *together*, so each layer is priced while the other ranks compete for the
cores, caches and memory bandwidth, and measures the two per-step terms the 1F1B simulator needs:

- ``transfer_s``: one boundary crossing (hidden states and int64 position ids) by gloo between two ranks,
  which both the sending and the receiving stage spend (a gloo send returns once the receiver has the
  data), so :class:`~pipefit.partition.costs.LayerCosts` marks it ``transfer_busy``;
- ``optimizer_s_per_param``: DeepSpeed ZeRO-1's per-step work per trainable parameter, rehearsed with the
  same tensor operations (copy of the accumulated gradients into the partition, its flattening, the
  gradient norm and clipping, torch's AdamW on the fp32 master, the copy back into the weights);
- ``link_bandwidth_gbs``: the bus bandwidth of a gloo all-reduce of fp32 gradients over the ranks
  (``2 (r-1)/r x bytes / seconds``), which prices the gradient reduction over dp and a tied weight's
  exchange in place of the hardware preset's ``link_bandwidth_gbs``.
"""

from __future__ import annotations

import os
import queue
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.partition.costs import Hardware, LayerCosts, ModelShape, Workload, reduce_seconds
from pipefit.partition.profile import (
    LayerProfile,
    _cache_key,
    layer_signature,
    load_profile_cache,
    measure_layer,
    profile_costs,
    save_profile_cache,
)

__all__ = [
    "ContendedProfile",
    "Measured",
    "combine",
    "contended_costs",
    "contended_profile",
    "measure_contended",
    "measure_in_group",
    "over_rounds",
]

OPTIMIZER_PROBE_PARAMS = 2_000_000


class Measured(NamedTuple):
    """What the contended profile measures of a model's distinct layers (:func:`measure_in_group`): each
    layer's :class:`LayerProfile` fields timed together and alone (rank 0), and the per-step terms."""

    layers: list[dict[str, Any]]
    transfer_s: float
    optimizer_s_per_param: float
    link_gbs: float | None
    alone: list[dict[str, Any]]


@dataclass(frozen=True)
class ContendedProfile:
    """Per-layer profiles measured with every rank busy, and the measured per-step terms."""

    layers: list[LayerProfile]
    transfer_s: float
    optimizer_s_per_param: float
    ranks: int
    link_bandwidth_gbs: float | None = None  # measured all-reduce bus bandwidth; None: one rank, the preset's
    alone: list[LayerProfile] | None = None  # each layer timed right after, the other ranks idle; None: one rank


def _optimizer_seconds(workload: Workload, params: int, repeats: int = 3) -> float:
    """Seconds of one ZeRO-1 optimizer step over ``params`` fp32 parameters (see the module docstring)."""
    import torch

    n = params // 4
    weights = [torch.randn(n) for _ in range(4)]
    grads = [torch.randn(n) for _ in range(4)]
    master = torch.cat(weights).requires_grad_(False)
    opt = torch.optim.AdamW([master], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        partition = [g.clone() for g in grads]  # get_flat_partition
        flat = torch.cat(partition)  # step: flatten
        del partition
        norm = torch.linalg.vector_norm(flat)
        flat.mul_(1.0 / max(float(norm), 1.0))
        master.grad = flat
        opt.step()
        master.grad = None
        offset = 0
        for w in weights:
            w.copy_(master[offset : offset + n])
            offset += n
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _transfer_seconds(workload: Workload, hidden: int, rank: int, repeats: int = 5) -> float:
    """Seconds for ranks 0 and 1 to pass one boundary's tensors (ping-pong, half a round trip)."""
    import torch
    import torch.distributed as dist

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[workload.precision]
    b, s = workload.micro_batch_size, workload.seq_len
    x = torch.zeros(b, s, hidden, dtype=dtype)
    ids = torch.zeros(b, s, dtype=torch.int64)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(x, 1)
            dist.send(ids, 1)
            dist.recv(x, 1)
            dist.recv(ids, 1)
        elif rank == 1:
            dist.recv(x, 0)
            dist.recv(ids, 0)
            dist.send(x, 0)
            dist.send(ids, 0)
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times[1:])


def _allreduce_bandwidth_gbs(ranks: int, params: int, repeats: int = 3) -> float:
    """Bus bandwidth (GB/s) of an all-reduce of ``params`` fp32 values over every rank: the ring's
    ``2 (r-1)/r x bytes`` moved per rank, over the median seconds."""
    import torch
    import torch.distributed as dist

    flat = torch.ones(params)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - t0)
    return 2 * (ranks - 1) / ranks * 4 * params / statistics.median(times[1:]) / 1e9


def measure_in_group(skeleton: Any, layers: Sequence[Any], workload: Workload, runs: int) -> Measured:
    """What one rank of a running gloo process group measures (every rank calls it at once; see the module
    docstring): ``layers`` timed together, then each right after by rank 0 alone, and the per-step terms.
    Only rank 0's ``layers``/``alone`` are used. The benchmarks call it between timed steps so that the
    prices and the steps they predict are measured in the same minutes of a shared machine."""
    import torch.distributed as dist

    rank, ranks = dist.get_rank(), dist.get_world_size()
    found, alone = [], []
    for layer in layers:
        dist.barrier()  # every rank starts the same layer together
        found.append(asdict(measure_layer(skeleton, layer, workload, "cpu", min_runs=runs, max_runs=runs)))
        if ranks > 1:  # and right after, rank 0 alone while the others wait
            dist.barrier()
            if rank == 0:
                alone.append(asdict(measure_layer(skeleton, layer, workload, "cpu", min_runs=runs, max_runs=runs)))
    dist.barrier()
    opt = _optimizer_seconds(workload, OPTIMIZER_PROBE_PARAMS) / OPTIMIZER_PROBE_PARAMS
    hidden = ModelShape.from_config(skeleton.config).hidden
    transfer = _transfer_seconds(workload, hidden, rank) if ranks > 1 else 0.0
    link = _allreduce_bandwidth_gbs(ranks, OPTIMIZER_PROBE_PARAMS) if ranks > 1 else None
    dist.barrier()
    return Measured(found, transfer, opt, link, alone)


def _worker(
    rank: int, ranks: int, store: str, recipe: tuple, indices: list[int], workload: Workload, runs: int, out: Any
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    config, seed, one_document_per_row = recipe  # the skeleton is rebuilt here: a used one may not pickle
    skeleton = make_skeleton(config, seed=seed)
    skeleton.one_document_per_row = one_document_per_row
    plan = layer_plan(skeleton)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    try:
        out.put((rank, measure_in_group(skeleton, [plan[i] for i in indices], workload, runs)))
    finally:
        dist.destroy_process_group()


def _spawn(skeleton: Any, layers: list[Any], workload: Workload, ranks: int, runs: int) -> Measured:
    """Start the ``ranks`` workers, each :func:`measure_in_group`, and :func:`combine` what they found."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        recipe = (skeleton.config, skeleton.seed, getattr(skeleton, "one_document_per_row", False))
        args = (ranks, store, recipe, [x.index for x in layers], workload, runs, out)
        procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(ranks)]
        for p in procs:
            p.start()
        results = []
        while len(results) < len(procs):  # a worker that dies never puts: the others would wait for it
            try:
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.terminate()
                    break
        for p in procs:
            p.join()
    if len(results) < len(procs) or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"measure_contended: a worker failed (exit codes {[p.exitcode for p in procs]})")
    results.sort(key=lambda r: r[0])
    return combine([r[1] for r in results])


def combine(per_rank: Sequence[Measured]) -> Measured:
    """One :class:`Measured` from every rank's: rank 0's layer timings, the transfer of ranks 0 and 1 and the
    optimizer's median over ranks, the slowest rank's all-reduce bandwidth (every rank waits for it)."""
    links = [r.link_gbs for r in per_rank if r.link_gbs is not None]
    return Measured(
        layers=per_rank[0].layers,
        transfer_s=statistics.median(r.transfer_s for r in per_rank[:2]),
        optimizer_s_per_param=statistics.median(r.optimizer_s_per_param for r in per_rank),
        link_gbs=min(links) if links else None,
        alone=per_rank[0].alone,
    )


def over_rounds(rounds: Sequence[Measured]) -> Measured:
    """The median of several measurements of the same layers (each field, each layer's each figure)."""

    def layers(lists: list[list[dict]]) -> list[dict]:
        return [{k: statistics.median(x[k] for x in same) for k in same[0]} for same in zip(*lists, strict=True)]

    links = [r.link_gbs for r in rounds if r.link_gbs is not None]
    return Measured(
        layers=layers([r.layers for r in rounds]),
        transfer_s=statistics.median(r.transfer_s for r in rounds),
        optimizer_s_per_param=statistics.median(r.optimizer_s_per_param for r in rounds),
        link_gbs=statistics.median(links) if links else None,
        alone=layers([r.alone for r in rounds]) if all(r.alone for r in rounds) else [],
    )


def measure_contended(
    skeleton: Any,
    plan: Sequence[Any],
    workload: Workload,
    ranks: int = 2,
    runs: int = 6,
    cache_dir: str | os.PathLike | None = None,
) -> ContendedProfile:
    """Every distinct layer of ``plan`` timed by ``ranks`` CPU processes at once (rank 0's figures), with
    the measured boundary transfer and optimizer terms (the median over ranks). Starts processes: call it
    from ``pipefit plan`` or a benchmark, not inside a running process group. Cached like the quiet
    profile (``cache_dir/profile.json``), keyed by every layer's signature, the shape and ``ranks``."""
    distinct = distinct_layers(skeleton, plan)
    signature = f"contended-v3:{ranks}x{runs}|" + "|".join(distinct)
    key = _cache_key(skeleton.config, signature, workload, workload.precision, "cpu")
    cache_file, cache = load_profile_cache(cache_dir)
    if key not in cache:
        cache[key] = _spawn(skeleton, list(distinct.values()), workload, ranks, runs)._asdict()
        save_profile_cache(cache_file, cache)
    return contended_profile(skeleton, plan, Measured(**cache[key]), ranks)


def distinct_layers(skeleton: Any, plan: Sequence[Any]) -> dict[str, Any]:
    """The layers that cost differently, by signature (blocks of one shape are measured once), in plan order."""
    distinct: dict[str, Any] = {}
    for layer in plan:
        distinct.setdefault(layer_signature(layer, skeleton.config), layer)
    return distinct


def contended_profile(skeleton: Any, plan: Sequence[Any], measured: Measured, ranks: int) -> ContendedProfile:
    """The :class:`ContendedProfile` of every layer of ``plan`` from a measurement of its distinct layers."""
    distinct = distinct_layers(skeleton, plan)

    def per_layer(found: Sequence[dict]) -> list[LayerProfile]:
        by_signature = {sig: LayerProfile(**x) for sig, x in zip(distinct, found, strict=True)}
        return [by_signature[layer_signature(layer, skeleton.config)] for layer in plan]

    return ContendedProfile(
        layers=per_layer(measured.layers),
        transfer_s=float(measured.transfer_s),
        optimizer_s_per_param=float(measured.optimizer_s_per_param),
        ranks=ranks,
        link_bandwidth_gbs=measured.link_gbs,
        alone=per_layer(measured.alone) if measured.alone else None,
    )


def contended_costs(
    hf_config: Any, plan: Sequence[Any], workload: Workload, hw: Hardware, measured: ContendedProfile
) -> LayerCosts:
    """:class:`LayerCosts` from :func:`measure_contended`: measured compute, transfers and per-step work.

    Per layer and step: its parameters times the measured optimizer seconds per parameter (divided over
    dp under ZeRO-1), plus, as in the ``flops`` model, the gradient all-reduce over dp and a tied weight's
    exchange, at the measured all-reduce bandwidth (the preset's link where only one rank was measured).
    The layers' prices with the other ranks idle go into ``alone_forward_s``/``alone_backward_s``, which the
    simulator mixes in by how busy each stage's peers are (:mod:`pipefit.partition.contention`).
    """
    base = profile_costs(hf_config, plan, workload, hw, measured.layers)
    shard = workload.dp if workload.zero_stage >= 1 else 1
    if measured.link_bandwidth_gbs is not None:
        hw = replace(hw, link_bandwidth_gbs=measured.link_bandwidth_gbs)
    reduce = reduce_seconds(plan, workload, hw)
    per_step = [x.num_params * measured.optimizer_s_per_param / shard + r for x, r in zip(plan, reduce, strict=True)]
    return replace(
        base,
        per_step_s=per_step,
        transfer_s=measured.transfer_s,
        transfer_busy=True,
        alone_forward_s=[x.forward_s for x in measured.alone] if measured.alone else [],
        alone_backward_s=[x.backward_s for x in measured.alone] if measured.alone else [],
        details={
            "contended_ranks": measured.ranks,
            "optimizer_s_per_param": measured.optimizer_s_per_param,
            "link_bandwidth_gbs": measured.link_bandwidth_gbs,
        },
    )
