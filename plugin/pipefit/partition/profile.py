"""The ``profile`` cost model: each distinct layer timed on this machine, one at a time, cached on disk.

Forward and backward time and saved-activation bytes are measured with the real micro-batch shape,
one materialised layer at a time; the figures end in the same :class:`~pipefit.partition.costs.LayerCosts`
as the analytic ``flops`` model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipefit.model.adapters import for_config
from pipefit.model.layer_list import build_layers
from pipefit.model.layers import causal_lm_loss
from pipefit.partition.costs import (
    Hardware,
    LayerCosts,
    ModelShape,
    Workload,
    _head_shape,
    _per_step_seconds,
    _transfer_seconds,
    attention_mask,
    model_flops,
    reduce_seconds,
)
from pipefit.partition.memory import memory_model


@dataclass(frozen=True)
class LayerProfile:
    """Median forward and backward seconds and saved-activation bytes of one layer, one micro-batch."""

    forward_s: float
    backward_s: float
    activation_bytes: float
    runs: int
    spread: float


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPEFIT_CACHE_DIR") or Path.home() / ".cache" / "pipefit")


def layer_signature(layer: Any, hf_config: Any) -> str:
    """Layers with the same signature cost the same: blocks of one shape are measured once."""

    kind = layer.kind
    if kind == "block":
        kind += ":" + for_config(hf_config).attention_kind(hf_config, layer.block_index)
    return f"{kind}|{'/'.join(layer.type_names)}|{layer.num_params}|tied={layer.tied}"


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-threads{torch.get_num_threads()}"


def _cache_key(hf_config: Any, signature: str, workload: Workload, dtype: str, device: str) -> str:
    import torch

    skip = ("transformers_version", "architectures")
    cfg = {k: v for k, v in sorted(hf_config.to_dict().items()) if not k.startswith("_") and k not in skip}
    raw = json.dumps(
        {
            "config": cfg,
            "attn": getattr(hf_config, "_attn_implementation", None),
            "layer": signature,
            "shape": [workload.micro_batch_size, workload.seq_len],
            "dtype": dtype,
            "device": _device_name(device),
            "torch": torch.__version__,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _saved_bytes_hooks(params: set[int], seen: dict[int, int]) -> Any:
    import torch

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def layer_pass(
    skeleton: Any, layer: Any, workload: Workload, device: str = "cpu"
) -> Callable[..., tuple[float, float]]:
    """One materialised layer with the micro-batch's inputs, as :func:`measure_layer` times it: a callable
    running its forward and backward once and returning their seconds; given a dict, it also records the
    bytes of every tensor autograd saves (by storage) into it."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[workload.precision]
    module = build_layers(skeleton, layer.index, layer.index + 1, device)[0]
    module.to(dtype=dtype)
    module.train()
    b, s = workload.micro_batch_size, workload.seq_len
    shape = ModelShape.from_config(skeleton.config)
    # The head reads the embedding's width (OPT's word_embed_proj_dim, after project_out), per token
    # (LM heads) or per row (a classifier on the pooled first token), and predicts one of `outputs`.
    h = shape.embed_dim if layer.kind == "head" else shape.hidden
    rows, outputs = _head_shape(skeleton.config, shape, b, s) if layer.kind == "head" else (b * s, shape.vocab)
    row_shape = (b, s) if rows == b * s else (b,)
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape.vocab, (b, s), generator=gen).to(device)
    hidden0 = torch.randn(*row_shape, h, generator=gen).to(device=device, dtype=dtype)
    targets = torch.randint(0, outputs, row_shape, generator=gen).to(device)
    scale = torch.tensor(1.0 / rows, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def once(count: dict[int, int] | None) -> tuple[float, float]:
        hidden = hidden0.clone().requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        ctx = _saved_bytes_hooks(params, count) if count is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            if layer.kind == "embed":
                out = module((ids, position_ids))[0]
            elif layer.kind == "head":
                out = causal_lm_loss(module(hidden), (targets, scale))
            else:  # blocks, norms and an encoder's head transform or pooler: hidden states in
                out = module((hidden, position_ids))
                out = out[0] if isinstance(out, tuple) else out
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        sync()
        t1 = time.perf_counter()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(torch.ones_like(out))
        sync()
        t2 = time.perf_counter()
        module.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    return once


def measure_layer(
    skeleton: Any,
    layer: Any,
    workload: Workload,
    device: str = "cpu",
    min_runs: int = 5,
    max_runs: int = 25,
    max_spread: float = 0.1,
    warmup: int = 2,
) -> LayerProfile:
    """Time forward and backward of one materialised layer until the last ``min_runs`` agree.

    Stable means (max - min) / median of the last ``min_runs`` total times <= ``max_spread``;
    after ``max_runs`` the medians are taken anyway (``spread`` reports what was reached).
    """
    once = layer_pass(skeleton, layer, workload, device)
    saved: dict[int, int] = {}
    once(saved)
    for _ in range(max(0, warmup - 1)):
        once(None)
    fwd: list[float] = []
    bwd: list[float] = []
    spread = math.inf
    while len(fwd) < max_runs:
        f, bw = once(None)
        fwd.append(f)
        bwd.append(bw)
        if len(fwd) >= min_runs:
            last = [x + y for x, y in zip(fwd[-min_runs:], bwd[-min_runs:], strict=True)]
            spread = (max(last) - min(last)) / max(statistics.median(last), 1e-12)
            if spread <= max_spread:
                break
    k = min(min_runs, len(fwd))
    return LayerProfile(
        forward_s=statistics.median(fwd[-k:]),
        backward_s=statistics.median(bwd[-k:]),
        activation_bytes=float(sum(saved.values())),
        runs=len(fwd),
        spread=spread,
    )


def load_profile_cache(cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """``cache_dir/profile.json`` (default :func:`default_cache_dir`) and its entries (``{}`` if missing/unreadable)."""
    cache_file = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "profile.json"
    if cache_file.is_file():
        try:
            return cache_file, json.loads(cache_file.read_text())
        except (OSError, ValueError):
            pass
    return cache_file, {}


def save_profile_cache(cache_file: Path, cache: dict[str, Any]) -> None:
    """Write the profile cache whole, through a temporary file and a rename (never half-written)."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(tmp, cache_file)


def profile_layers(
    skeleton: Any,
    plan: Sequence[Any],
    workload: Workload,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    measure: bool = True,
    broadcast: Callable[[Any], Any] | None = None,
    **measure_kwargs: Any,
) -> list[LayerProfile]:
    """One :class:`LayerProfile` per pipeline layer; each distinct layer is measured once.

    Results are cached in ``cache_dir/profile.json`` (default ``$PIPEFIT_CACHE_DIR`` or
    ``~/.cache/pipefit``), keyed by (config, layer signature, micro-batch shape, dtype, device,
    torch version). For a multi-rank run, pass ``measure=(rank == 0)`` and a ``broadcast(obj) -> obj``
    that returns rank 0's object on every rank (e.g. around ``torch.distributed.broadcast_object_list``):
    only rank 0 measures, and every rank returns the same figures.
    """
    result: list[dict[str, Any]] | None = None
    if measure:
        cache_file, cache = load_profile_cache(cache_dir)
        by_signature: dict[str, dict[str, Any]] = {}
        changed = False
        for layer in plan:
            sig = layer_signature(layer, skeleton.config)
            if sig in by_signature:
                continue
            key = _cache_key(skeleton.config, sig, workload, workload.precision, device)
            if key not in cache:
                cache[key] = asdict(measure_layer(skeleton, layer, workload, device, **measure_kwargs))
                changed = True
            by_signature[sig] = cache[key]
        if changed:
            save_profile_cache(cache_file, cache)
        result = [by_signature[layer_signature(layer, skeleton.config)] for layer in plan]
    if broadcast is not None:
        result = broadcast(result)
    if result is None:
        raise ValueError("profile_layers(measure=False) needs a broadcast that returns rank 0's measurements")
    return [LayerProfile(**entry) for entry in result]


def profile_costs(
    hf_config: Any, plan: Sequence[Any], workload: Workload, hw: Hardware, profiles: Sequence[LayerProfile]
) -> LayerCosts:
    """``pipeline.partition=profile``: measured compute, modelled per-step work and transfers."""
    return LayerCosts(
        method="profile",
        forward_s=[p.forward_s for p in profiles],
        backward_s=[p.backward_s for p in profiles],
        per_step_s=_per_step_seconds(plan, workload, hw),
        reduce_s=reduce_seconds(plan, workload, hw),
        transfer_s=_transfer_seconds(hf_config, workload, hw),
        micro_batches=workload.micro_batches,
        memory=memory_model(plan, workload, [p.activation_bytes for p in profiles], hw),
        memory_cap=hw.memory_gib * 2**30,
        tied=tuple(x.index for x in plan if x.tied),
        flops=model_flops(hf_config, plan, workload.seq_len, workload.micro_batch_size),
        attention_masks=[attention_mask(hf_config, x, workload) for x in plan],
    )
