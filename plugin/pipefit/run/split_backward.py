"""The split backward of zero-bubble pipelining: B computes input gradients, W the Linear weight gradients.

:func:`install_split_linears` gives each trainable ``nn.Linear`` of a stage (decoder blocks, an
untied head, peft's ``lora_A``/``lora_B``) a forward through :class:`SplitLinearFunction`, on
that module instance only. Its backward computes the input gradient (and the bias gradient, which
does not pay to defer) at once; while a :class:`WeightGradQueue` is collecting, the weight
gradient's inputs ``(input, grad_output)`` go into the queue instead of the GEMM, and
:meth:`WeightGradQueue.run` later computes ``grad_output^T @ input`` and accumulates it into
``weight.grad`` exactly as autograd's AccumulateGrad would (set when empty, added in place
otherwise). Outside collection (1F1B, evaluation) the weight gradient is computed in the backward
as usual. Frozen weights (a LoRA base layer) keep ``nn.Linear``'s own forward: they have no W.

With activation checkpointing the forward is recomputed inside B, so the queue holds the
recomputed inputs. Norms, embeddings and a tied head (``F.linear`` on the embedding weight) take
their gradients in B. The forward is ``F.linear`` itself, and both gradients are the same GEMMs as
autograd's for ``linear`` (``grad_output @ weight``; ``(input^T @ grad_output)^T``), so results
equal autograd's.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradQueue:
    """The deferred weight GEMMs of each micro-batch, keyed by micro-batch id."""

    def __init__(self) -> None:
        self.collecting: list[Deferred] | None = None
        self.pending: dict[int, list[Deferred]] = {}
        self.gemms = 0  # weight GEMMs run by W so far (what tests and logs read)

    def collect(self, micro_batch: int) -> _Collecting:
        """Context: weight GEMMs of backwards run inside it are queued for ``micro_batch``."""
        return _Collecting(self, micro_batch)

    def run(self, micro_batch: int) -> int:
        """W: compute and accumulate ``micro_batch``'s weight gradients (in the order B queued them)."""
        n = 0
        with torch.no_grad():
            for weight, inp, grad_out, transposed in self.pending.pop(micro_batch, []):
                grad = weight_grad(inp, grad_out, transposed)
                if weight.grad is None:  # as AccumulateGrad: the gradient takes the parameter's layout
                    weight.grad = grad.contiguous()
                else:
                    weight.grad.add_(grad)
                n += 1
        self.gemms += n
        return n

    def detach_from(self, micro_batch: int, buffers: list[torch.Tensor]) -> int:
        """Copy the queued tensors of ``micro_batch`` that live in ``buffers`` (storage reused before W,
        e.g. DeepSpeed's one received-gradient buffer, which a residual add hands on to the last
        projection unchanged); returns how many were copied."""
        reused = {b.untyped_storage().data_ptr() for b in buffers}
        copied = 0
        entries = self.pending.get(micro_batch, [])
        for n, (weight, inp, grad_out, transposed) in enumerate(entries):
            if inp.untyped_storage().data_ptr() in reused or grad_out.untyped_storage().data_ptr() in reused:
                inp = inp.clone() if inp.untyped_storage().data_ptr() in reused else inp
                grad_out = grad_out.clone() if grad_out.untyped_storage().data_ptr() in reused else grad_out
                entries[n] = (weight, inp, grad_out, transposed)
                copied += 1
        return copied

    def saved_bytes(self) -> int:
        """Bytes held by the queue now (inputs and output gradients; an input shared by several GEMMs once)."""
        seen: dict[int, int] = {}
        for entries in self.pending.values():
            for _, inp, grad_out, _ in entries:
                for t in (inp, grad_out):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())


class _Collecting:
    def __init__(self, queue: WeightGradQueue, micro_batch: int) -> None:
        self.queue, self.micro_batch = queue, micro_batch

    def __enter__(self) -> None:
        if self.queue.collecting is not None:
            raise RuntimeError("a backward is already collecting weight gradients")
        self.queue.collecting = self.queue.pending.setdefault(self.micro_batch, [])

    def __exit__(self, *exc: object) -> None:
        self.queue.collecting = None


def weight_grad(inp: torch.Tensor, grad_out: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The weight gradient by the very product autograd's ``mm`` backward takes (bitwise equal on every
    BLAS): for ``linear`` the weight enters as ``weight.t()``, column-major, so autograd forms
    ``grad_output^T @ input`` (``[out, in]``); for a GPT-2 ``Conv1D`` the row-major weight ``[in, out]``
    gets ``input^T @ grad_output``."""
    x, g = inp.reshape(-1, inp.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    return x.t().mm(g) if transposed else g.t().mm(x)


class SplitLinearFunction(torch.autograd.Function):
    """``F.linear`` (or GPT-2's ``Conv1D``, ``transposed``) whose weight gradient is queued for W while
    its queue is collecting."""

    @staticmethod
    def forward(
        ctx: Any,
        inp: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        queue: WeightGradQueue,
        transposed: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(inp, weight)
        ctx.queue, ctx.transposed = queue, transposed
        ctx.weight = weight  # the Parameter itself (saved tensors unpack as plain tensors)
        ctx.has_bias = bias is not None
        if not transposed:
            return F.linear(inp, weight, bias)
        # transformers' Conv1D.forward, operation for operation
        out = torch.addmm(bias, inp.view(-1, inp.size(-1)), weight)
        return out.view(inp.size()[:-1] + (weight.shape[1],))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        inp, weight = ctx.saved_tensors
        need_in, need_w, need_b, _, _ = ctx.needs_input_grad
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_in = None
        if need_in:
            grad_in = (rows.mm(weight.t()) if ctx.transposed else rows.mm(weight)).reshape(inp.shape)
        grad_b = rows.sum(0) if need_b and ctx.has_bias else None
        grad_w = None
        if need_w:
            queue = ctx.queue.collecting
            if queue is not None:
                queue.append((ctx.weight, inp.detach(), grad_out.detach(), ctx.transposed))
            else:
                grad_w = weight_grad(inp, grad_out, ctx.transposed)
        return grad_in, grad_w, grad_b, None, None


# (weight, input, grad_output, transposed): one deferred weight GEMM.
Deferred = tuple[nn.Parameter, torch.Tensor, torch.Tensor, bool]


def _split_forward(self: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    return SplitLinearFunction.apply(inp, self.weight, self.bias, self._weight_grad_queue, self._weight_transposed)


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's projections: a Linear with weight [in, out]
    except ImportError:  # pragma: no cover - transformers is a dependency; keep the split usable without it
        return None
    return Conv1D


def install_split_linears(module: nn.Module, queue: WeightGradQueue) -> list[str]:
    """Route every trainable ``nn.Linear`` (and GPT-2 ``Conv1D``) of ``module`` through the split
    backward, on those instances only; returns their names."""
    conv1d = _conv1d_class()
    names = []
    for name, sub in module.named_modules():
        transposed = conv1d is not None and type(sub) is conv1d
        if (type(sub) is nn.Linear or transposed) and sub.weight.requires_grad:
            sub._weight_grad_queue = queue
            sub._weight_transposed = transposed
            sub.forward = types.MethodType(_split_forward, sub)
            names.append(name)
    return names
