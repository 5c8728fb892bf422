"""Zero-bubble (pipeline.schedule=zb1p) without processes: the ZB-H1 order, and the split backward."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipefit.partition.zero_bubble_sim import Op, zb_h1_order
from pipefit.run.split_backward import WeightGradQueue, install_split_linears, weight_grad
from pipefit.run.zero_bubble import num_pipe_buffers, zb_h1_steps

CASES = [(p, m) for p in (2, 4) for m in (1, 2, 4, 8)]


def one_f_one_b_kinds(stages: int, micro_batches: int, stage: int) -> str:
    """DeepSpeed's TrainSchedule for ``stage``: its forwards and backwards in order, as a string of F and B."""
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    kinds = ""
    for cmds in TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage):
        kinds += "".join(
            "F" if isinstance(c, ForwardPass) else "B" for c in cmds if isinstance(c, (ForwardPass, BackwardPass))
        )
    return kinds


@pytest.mark.parametrize("stages,micro_batches", CASES)
def test_every_micro_batch_gets_f_b_w_once_in_order_with_1f1b_forwards_and_backwards(stages: int, micro_batches: int):
    for stage in range(stages):
        ops = zb_h1_order(stages, micro_batches, stage)
        assert sorted(ops) == sorted(Op(k, i) for k in "FBW" for i in range(micro_batches))
        for i in range(micro_batches):
            assert ops.index(Op("F", i)) < ops.index(Op("B", i)) < ops.index(Op("W", i))
        for kind in "FBW":  # each pass in micro-batch order (W accumulates gradients as 1F1B does)
            assert [o.micro_batch for o in ops if o.kind == kind] == list(range(micro_batches))
        # F and B exactly as DeepSpeed's 1F1B: same warm-up, same in-flight activations.
        assert "".join(o.kind for o in ops if o.kind != "W") == one_f_one_b_kinds(stages, micro_batches, stage)

        # In-flight activations (F done, B not yet) and queued W passes never exceed 1F1B's in-flight count;
        # stage s holds back at most s of them (stage 0 runs each W right after its B).
        kinds = [o.kind for o in ops]

        def most(a: str, b: str, kinds: list[str] = kinds) -> int:
            return max(kinds[: n + 1].count(a) - kinds[: n + 1].count(b) for n in range(len(kinds)))

        assert most("F", "B") == min(stages - stage, micro_batches)
        assert most("B", "W") == min(stage + 1, micro_batches)


def run_pipeline(stages: int, micro_batches: int) -> dict[int, list[str]]:
    """Execute every stage's instructions with non-blocking sends and blocking receives (as the engine
    does): every receive matches the next unreceived send of its peer, in order; no deadlock; each
    buffer holds at most one micro-batch at a time. Returns each stage's executed computations."""
    programs = {s: deque(zb_h1_steps(stages, micro_batches, s)) for s in range(stages)}
    channels: dict[tuple[int, int, str], deque[int]] = {}
    held: dict[int, dict[int, int]] = {s: {} for s in range(stages)}  # buffer -> micro-batch in flight
    loaded: dict[int, int] = dict.fromkeys(range(stages), 0)
    done: dict[int, list[str]] = {s: [] for s in range(stages)}
    while any(programs.values()):
        progressed = False
        for s, prog in programs.items():
            while prog:
                step = prog[0]
                name, kw = step[0]
                if name in ("RecvActivation", "RecvGrad"):
                    src, kind = (s - 1, "act") if name == "RecvActivation" else (s + 1, "grad")
                    chan = channels.get((src, s, kind))
                    if not chan:
                        break  # blocked on the receive
                for name, kw in prog.popleft():
                    buf = kw.get("buffer_id")
                    if name == "RecvActivation":
                        mb = channels[(s - 1, s, "act")].popleft()
                        assert buf not in held[s], f"stage {s} buffer {buf} still holds micro-batch {held[s].get(buf)}"
                        held[s][buf] = mb
                    elif name == "LoadMicroBatch" and s == 0:
                        assert buf not in held[s]
                        held[s][buf] = loaded[s]
                        loaded[s] += 1
                    elif name == "ForwardPass":
                        mb = held[s][buf]
                        done[s].append(f"F{mb}")
                    elif name == "SendActivation":
                        channels.setdefault((s, s + 1, "act"), deque()).append(held[s][buf])
                    elif name == "RecvGrad":
                        mb = channels[(s + 1, s, "grad")].popleft()
                        assert held[s][buf] == mb, (s, buf, held[s], mb)
                    elif name == "BackwardInput":
                        assert held[s][buf] == kw["micro_batch_id"]
                        done[s].append(f"B{kw['micro_batch_id']}")
                        if s == 0:
                            del held[s][buf]
                    elif name == "SendGrad":
                        channels.setdefault((s, s - 1, "grad"), deque()).append(held[s].pop(buf))
                    elif name == "BackwardWeight":
                        done[s].append(f"W{kw['micro_batch_id']}")
                progressed = True
        assert progressed, f"deadlock: {[list(p)[:1] for p in programs.values()]}"
    assert all(not c for c in channels.values()), "a send was never received"
    assert all(not h for h in held.values())
    return done


@pytest.mark.parametrize("stages,micro_batches", CASES)
def test_sends_match_receives_and_the_pipeline_completes(stages: int, micro_batches: int):
    done = run_pipeline(stages, micro_batches)
    for s in range(stages):
        assert done[s] == [f"{k}{i}" for k, i in zb_h1_order(stages, micro_batches, s)]
        steps = list(zb_h1_steps(stages, micro_batches, s))
        assert [name for name, _ in steps[-1][-3:]] == ["ReduceTiedGrads", "ReduceGrads", "OptimizerStep"]
        assert sum(name == "OptimizerStep" for cmds in steps for name, _ in cmds) == 1
        buffers = {kw["buffer_id"] for cmds in steps for _, kw in cmds if "buffer_id" in kw}
        assert len(buffers) <= num_pipe_buffers(stages, micro_batches, s)


def test_deepspeed_schedule_class_yields_deepspeed_instructions():
    from deepspeed.runtime.pipe import schedule as ds

    from pipefit.run.pipe_engine import engine_class
    from pipefit.run.zero_bubble import BackwardInput, BackwardWeight, schedule_class

    sched = schedule_class()(micro_batches=4, stages=2, stage_id=1)
    assert isinstance(sched, ds.PipeSchedule) and sched.num_pipe_buffers() == 2
    flat = [c for cmds in sched for c in cmds]
    assert [type(c).__name__ for c in flat[:4]] == ["RecvActivation", "LoadMicroBatch", "ForwardPass", "BackwardInput"]
    assert isinstance(flat[0], ds.RecvActivation) and flat[3].kwargs == {"buffer_id": 0, "micro_batch_id": 0}
    # The engine runs pipefit's instructions through its map, DeepSpeed's through its own handlers.
    cls = engine_class()
    assert cls._INSTRUCTION_MAP[BackwardInput].__name__ == "_exec_backward_input"
    assert cls._INSTRUCTION_MAP[BackwardWeight].__name__ == "_exec_backward_weight"
    # Private DeepSpeed API the zb1p path relies on (pinned in pyproject.toml).
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine

    for name in ("_train_schedule", "_exec_backward_pass", "_exec_schedule"):
        assert callable(getattr(PipelineEngine, name))
    for name in ("clear_lp_grads", "update_hp_grads"):
        assert callable(getattr(BF16_Optimizer, name))


# --- the split backward -------------------------------------------------------------------------


def _pair(module_fn: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module, WeightGradQueue]:
    torch.manual_seed(0)
    ref = module_fn()
    split = module_fn()
    split.load_state_dict(ref.state_dict())
    queue = WeightGradQueue()
    return ref, split, queue


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 16), (5, 16)])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_split_linear_grads_equal_autograds_exactly(bias: bool, shape: tuple[int, ...], kind: str):
    from transformers.pytorch_utils import Conv1D

    if kind == "conv1d" and not bias:
        pytest.skip("Conv1D always has a bias")
    make = (lambda: nn.Linear(16, 24, bias=bias)) if kind == "linear" else (lambda: Conv1D(24, 16))
    ref, split, queue = _pair(make)
    assert install_split_linears(split, queue) == [""]
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(*shape[:-1], 24)
    out_ref = ref(x)
    out = split(x2)
    assert torch.equal(out, out_ref)
    out_ref.backward(g)
    with queue.collect(0):
        out.backward(g)
    assert split.weight.grad is None  # B: no weight gradient yet ...
    assert torch.equal(x2.grad, x.grad)
    if bias:
        assert torch.equal(split.bias.grad, ref.bias.grad)  # ... but the bias has its own
    assert queue.saved_bytes() == x2.numel() * 4 + g.numel() * 4
    assert queue.run(0) == 1 and queue.gemms == 1
    assert torch.equal(split.weight.grad, ref.weight.grad) and split.weight.grad.is_contiguous()
    # A second micro-batch accumulates as autograd does.
    ref(x).backward(g)
    with queue.collect(1):
        split(x2).backward(g)
    queue.run(1)
    assert torch.equal(split.weight.grad, ref.weight.grad)
    # Outside a collecting backward the weight gradient comes at once (1F1B, evaluation).
    ref(x).backward(g)
    split(x2).backward(g)
    assert torch.equal(split.weight.grad, ref.weight.grad) and not queue.pending


def test_frozen_weights_are_not_split_and_lora_adapters_are():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.o_proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o_proj(torch.tanh(self.q_proj(x)))

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        for n, p in model.named_parameters():  # non-zero B so that lora_A's gradient is not zero
            if "lora_B" in n:
                nn.init.normal_(p)
        return model

    ref, split = make(), make()
    queue = WeightGradQueue()
    names = install_split_linears(split, queue)
    assert sorted(n.rsplit(".", 2)[-2] for n in names) == ["lora_A", "lora_B"]  # frozen bases keep their forward
    x = torch.randn(4, 8)
    ref(x).square().sum().backward()
    with queue.collect(0):
        split(x).square().sum().backward()
    assert queue.run(0) == 2
    for (n, p), (_, q) in zip(ref.named_parameters(), split.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


def test_activation_checkpointing_queues_the_recomputed_inputs():
    from torch.utils.checkpoint import checkpoint

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    ref, split = make(), make()
    queue = WeightGradQueue()
    install_split_linears(split, queue)
    x = torch.randn(3, 8, requires_grad=True)
    checkpoint(ref, x, use_reentrant=False).sum().backward()
    out = checkpoint(split, x.detach().requires_grad_(), use_reentrant=False)
    with queue.collect(0):
        out.sum().backward()
    assert len(queue.pending[0]) == 2 and all(p.grad is None for p in (split[0].weight, split[2].weight))
    queue.run(0)
    for p, q in zip(ref.parameters(), split.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_weight_grad_is_autograds_layout():
    x, g = torch.randn(6, 4), torch.randn(6, 5)
    assert weight_grad(x, g).shape == (5, 4) and weight_grad(x, g, transposed=True).shape == (4, 5)


@pytest.mark.parametrize("rows,fan_in,fan_out", [(3, 8, 16), (3, 16, 8), (7, 300, 5), (37, 64, 48)])
def test_weight_grad_is_autograds_product_bit_for_bit(rows, fan_in, fan_out):
    # x^T @ g transposed holds the same numbers as g^T @ x, summed in another order on some BLAS kernels:
    # W must take autograd's own product (small shapes show the difference here).
    torch.manual_seed(0)
    x, weight = torch.randn(rows, fan_in), torch.randn(fan_out, fan_in, requires_grad=True)
    conv_weight = weight.detach().t().contiguous().requires_grad_()  # GPT-2 Conv1D: [in, out]
    g = torch.randn(rows, fan_out)
    F.linear(x, weight).backward(g)
    torch.addmm(torch.zeros(fan_out), x, conv_weight).backward(g)
    assert torch.equal(weight_grad(x, g), weight.grad)
    assert torch.equal(weight_grad(x, g, transposed=True), conv_weight.grad)


def test_queued_gradient_in_a_reused_receive_buffer_is_copied_before_the_next_receive():
    # DeepSpeed receives every micro-batch's output gradient into one buffer (engine.grad_layer); a
    # residual add hands that very tensor to the block's last projection as its grad_output.
    import inspect

    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert "p2p.recv(self.grad_layer" in inspect.getsource(PipelineEngine._exec_recv_grads)

    ref, split, queue = _pair(lambda: nn.Linear(4, 4))
    install_split_linears(split, queue)
    x = torch.randn(3, 4)
    received = torch.randn(3, 4)  # the receive buffer
    expected = weight_grad(x, received.clone())
    with queue.collect(0):
        (split(x) + x).backward(received)  # the add passes `received` itself on
    assert queue.pending[0][0][2].untyped_storage().data_ptr() == received.untyped_storage().data_ptr()
    assert queue.detach_from(0, [received]) == 1
    received.fill_(7.0)  # the next micro-batch's gradient arrives
    queue.run(0)
    assert torch.equal(split.weight.grad, expected)
