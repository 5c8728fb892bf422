"""``train.trace``: the tracer's spans and breakdown (fake clock), pipefit's engine subclass and the
DeepSpeed API it relies on, the bad inputs, and one real traced run (slow)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pipefit.config import ConfigError, validate
from pipefit.run.pipe_engine import PipefitEngineMixin, adopt, engine_class
from pipefit.run.trace import CATEGORY, Tracer, breakdown, chrome_trace, per_instruction

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "config"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tracer_records_only_the_step_range_and_breaks_a_step_down_by_kind() -> None:
    clock = FakeClock()
    tracer = Tracer(first=2, last=2, clock=clock)

    def step(n: int) -> None:
        tracer.begin_step(n)
        clock.now += 0.5  # idle: between train_batch's start and the first instruction
        with tracer.span("ForwardPass", 0):
            clock.now += 2.0
        with tracer.span("RecvGrad", 0):
            clock.now += 1.0
        with tracer.span("OptimizerStep"):
            with tracer.span("GradNorm"):  # nested: shown, not counted twice
                clock.now += 0.25
            clock.now += 0.75
        with tracer.span("Logging"):
            clock.now += 0.5
        tracer.end_step()

    for n in (1, 2, 3):
        step(n)
    assert [s[0] for s in tracer.spans] == ["ForwardPass", "RecvGrad", "GradNorm", "OptimizerStep", "Logging"]
    assert {s[3] for s in tracer.spans} == {2}
    assert [s[4] for s in tracer.spans] == [0, 0, 1, 0, 0]
    assert tracer.steps == [(2, 5.0, 10.0)]
    rec = tracer.records(rank=1, stage=1, data=0)
    table = breakdown([rec])
    assert table[1] == {
        "compute": 2.0,
        "communication": 1.0,
        "optimizer": 1.0,
        "data": 0.0,
        "logging": 0.5,
        "evaluation": 0.0,
        "idle": 0.5,
        "step_s": 5.0,
    }
    assert per_instruction([rec])[1]["GradNorm"] == 0.25


def test_breakdown_takes_each_stages_slowest_replica_and_chrome_trace_has_one_track_each() -> None:
    recs = []
    for rank, (stage, data, length) in enumerate([(0, 0, 1.0), (0, 1, 3.0), (1, 0, 2.0), (1, 1, 2.0)]):
        spans = [("BackwardPass", 10.0, 10.0 + length / 2, 1, 0, 3)]
        recs.append({"rank": rank, "stage": stage, "data": data, "spans": spans, "steps": [(1, 10.0, 10.0 + length)]})
    table = breakdown(recs)
    assert table[0]["step_s"] == 3.0 and table[0]["compute"] == 1.5 and table[0]["idle"] == 1.5
    assert table[1]["step_s"] == 2.0
    trace = chrome_trace(recs)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "BackwardPass"]
    assert sorted((e["pid"], e["tid"]) for e in spans) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    slow = next(e for e in spans if (e["pid"], e["tid"]) == (0, 1))
    assert slow["ts"] == 0.0 and slow["dur"] == 1.5e6 and slow["args"] == {"step": 1, "buffer": 3}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"data 0 (rank 0)", "data 1 (rank 1)", "data 0 (rank 2)", "data 1 (rank 3)"}


def test_clock_alignment_shifts_only_ranks_on_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    monkeypatch.setattr(time, "time", lambda: 1000.0)
    clock = FakeClock()
    clock.now = 40.0
    for host0, expected in (("here", 960.0), ("elsewhere", 960.0 + 7.0)):
        monkeypatch.setattr(socket, "gethostname", lambda: "here")
        tracer = Tracer(clock=clock)

        def gather(out: list[Any], mine: Any, host0: str = host0) -> None:
            out[0] = (host0, 1007.0)  # rank 0's time.time() when it left the barrier
            out[1] = mine

        tracer.align(gather, lambda: None, 2)
        assert tracer.to_shared == expected


# --- the engine subclass -----------------------------------------------------------------------


class LoadMicroBatch:
    def __init__(self, buffer_id: int) -> None:
        self.kwargs = {"buffer_id": buffer_id}


class OptimizerStep:
    kwargs: dict[str, Any] = {}


class Schedule:
    def num_pipe_buffers(self) -> int:
        return 2

    def __iter__(self) -> Any:
        return iter([[LoadMicroBatch(0)], [LoadMicroBatch(1), OptimizerStep()]])


class FakeEngine(PipefitEngineMixin):
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.reserved = 0

    def _reserve_pipe_buffers(self, n: int) -> None:
        self.reserved = n

    def _load(self, buffer_id: int) -> None:
        self.calls.append(("load", buffer_id))

    def _step(self) -> None:
        self.calls.append("step")

    _INSTRUCTION_MAP = {LoadMicroBatch: _load, OptimizerStep: _step}


@pytest.mark.parametrize("traced", [False, True])
def test_engine_runs_every_instruction_in_order_and_times_each_when_traced(traced: bool) -> None:
    engine = FakeEngine()
    tracer = Tracer(first=1, last=1)
    engine.trace(tracer)
    tracer.begin_step(1 if traced else 5)
    engine._exec_schedule(Schedule())
    assert engine.calls == [("load", 0), ("load", 1), "step"]
    assert engine.reserved == 2 and engine.fwd_outputs == []
    got = [(s[0], s[5]) for s in tracer.spans]
    assert got == ([("LoadMicroBatch", 0), ("LoadMicroBatch", 1), ("OptimizerStep", -1)] if traced else [])


def test_deepspeed_pipeline_engine_api_pipefit_relies_on() -> None:
    """Pins the private DeepSpeed API of pipefit.run.pipe_engine: if this fails, DeepSpeed changed it."""
    import inspect

    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    for name in ("_exec_schedule", "_reserve_pipe_buffers", "_aggregate_total_loss"):
        assert callable(getattr(PipelineEngine, name)), name
    assert list(inspect.signature(PipelineEngine._exec_schedule).parameters) == ["self", "pipe_schedule"]
    assert "self.fwd_outputs = []" in inspect.getsource(PipelineEngine._exec_schedule)
    mapped = {cls.__name__ for cls in PipelineEngine._INSTRUCTION_MAP}
    assert mapped == {n for n in CATEGORY if hasattr(schedule, n)}
    assert mapped == {
        "OptimizerStep",
        "ReduceGrads",
        "ReduceTiedGrads",
        "LoadMicroBatch",
        "ForwardPass",
        "BackwardPass",
        "SendActivation",
        "RecvActivation",
        "SendGrad",
        "RecvGrad",
    }
    send_act = inspect.getsource(PipelineEngine._exec_send_activations)
    for line in ("self._send_tensor_meta(outputs, self.next_stage)", "p2p.send(buffer, self.next_stage)"):
        assert line in send_act, line
    send_grad = inspect.getsource(PipelineEngine._exec_send_grads)
    for line in ("p2p.send(buffer.grad, self.prev_stage)", "self.pipe_buffers['inputs'][buffer_id] = None"):
        assert line in send_grad, line
    cls = engine_class()
    assert issubclass(cls, PipelineEngine) and cls._exec_schedule is PipefitEngineMixin._exec_schedule
    assert cls._INSTRUCTION_MAP[schedule.SendActivation] is PipefitEngineMixin._exec_send_activations
    assert cls._INSTRUCTION_MAP[schedule.SendGrad] is PipefitEngineMixin._exec_send_grads
    assert cls._INSTRUCTION_MAP[schedule.ForwardPass] is PipelineEngine._exec_forward_pass
    with pytest.raises(RuntimeError, match="expected DeepSpeed's PipelineEngine"):
        adopt(object())


def _bare_engine(stage: int) -> Any:
    """An engine of pipefit's class with only what sending reads (no process group, no module)."""
    import torch

    class Grid:
        def stage_to_global(self, stage_id: int) -> int:
            return 10 + stage_id

    engine = object.__new__(engine_class())
    engine.__dict__.update(
        dynamic_shape=False,
        has_attention_mask=False,
        has_bool_tensors=False,
        is_pipe_partitioned=False,
        is_grad_partitioned=False,
        first_output_send=False,
        stage_id=stage,
        next_stage=stage + 1,
        prev_stage=stage - 1,
        grid=Grid(),
        _pending_sends=[],
        pipe_buffers={"outputs": [None, None], "inputs": [None, None]},
    )
    engine.wall_clock_breakdown = lambda: False
    hidden, positions = torch.randn(2, 3, requires_grad=True), torch.arange(3).expand(2, 3)
    return engine, hidden, positions


def test_activations_and_gradients_are_sent_without_waiting_for_the_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tensors, in order, to the same rank, by isend; DeepSpeed's blocking send is never used;
    every send is waited for once the schedule ends."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.pipe import p2p

    sent: list[tuple[Any, int]] = []
    waited: list[int] = []

    class Work:
        def __init__(self, n: int) -> None:
            self.n = n

        def wait(self) -> None:
            waited.append(self.n)

    def isend(tensor: Any, dst: int) -> Work:
        sent.append((tensor, dst))
        return Work(len(sent))

    def blocking(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("DeepSpeed's blocking send was used")

    monkeypatch.setattr(dist, "isend", isend)
    monkeypatch.setattr(p2p, "send", blocking)
    engine, hidden, positions = _bare_engine(0)
    out = (hidden * 2, positions)
    engine.pipe_buffers["outputs"][1] = out
    engine._exec_send_activations(buffer_id=1)
    assert [(t is o, d) for (t, d), o in zip(sent, out, strict=True)] == [(True, 11), (True, 11)]

    sent.clear()
    engine, hidden, positions = _bare_engine(1)
    hidden.grad = torch.ones(2, 3)
    engine.pipe_buffers["inputs"][0] = (hidden, positions)
    engine._exec_send_grads(buffer_id=0)
    assert len(sent) == 1 and sent[0][0] is hidden.grad and sent[0][1] == 10  # position ids have no gradient
    assert engine.pipe_buffers["inputs"][0] is None
    assert waited == []
    engine._wait_sends()
    assert waited == [1] and engine._pending_sends == []


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["train.max_steps=10", "train.trace_steps=[5,12]"],
            "train.trace_steps=[5, 12] is not accepted; expected [first, last] with 1 <= first <= last <= "
            "train.max_steps (10), or null (every step)",
        ),
        (
            ["train.max_steps=10", "train.trace_steps=[0,3]"],
            "train.trace_steps=[0, 3] is not accepted; expected [first, last] with 1 <= first <= last <= "
            "train.max_steps (10), or null (every step)",
        ),
        (
            ["train.max_steps=10", "train.stop_after_steps=4", "train.trace_steps=[3,6]"],
            "train.trace_steps=[3, 6] is not accepted; expected [first, last] with 1 <= first <= last <= "
            "train.stop_after_steps (4), or null (every step)",
        ),
        (
            ["train.max_steps=10", "train.trace_steps=[3]"],
            "train.trace_steps=[3] is not accepted; expected [first, last] with 1 <= first <= last <= "
            "train.max_steps (10), or null (every step)",
        ),
    ],
)
def test_trace_step_range_outside_the_run_is_one_line(overrides: list[str], message: str) -> None:
    from launching import compose

    validate(compose(["train.trace=true", "train.max_steps=10", "train.trace_steps=[2,10]"]))
    with pytest.raises(ConfigError) as info:
        validate(compose(["train.trace=true", *overrides]))
    assert str(info.value) == message


def test_unwritable_trace_dir_is_one_line_before_any_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_config import _prepare

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root ignores permission bits: make os.access answer as a read-only folder would
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not (Path(p) == locked and mode & 2))
    trace_dir = locked / "traces"
    _prepare(tmp_path / "run", f"train.trace_dir={trace_dir}")  # not traced: not checked
    with pytest.raises(ConfigError) as info:
        _prepare(tmp_path / "run", "train.trace=true", f"train.trace_dir={trace_dir}")
    assert str(info.value) == (
        f"train.trace_dir={str(trace_dir)!r} is not writable (no write permission on {str(locked)!r}); "
        "give a folder you can write to"
    )


# --- a real traced run ---------------------------------------------------------------------------


@pytest.mark.slow
def test_traced_run_records_every_instruction_and_trains_as_the_reference(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from conftest import saved_model
    from launching import compose, local_run, losses_match, metrics, run_recipe, tail
    from pipefit.parity.reference import train_reference
    from pipefit.run.preflight import Prepared

    folder, _ = saved_model(tmp_path, "llama")
    out = tmp_path / "run"
    overrides = local_run(folder, out, 4, "train.trace=true", "train.trace_steps=[2,3]", "train.export=false", accum=3)
    proc = run_recipe(overrides)
    assert proc.returncode == 0, tail(proc)
    run = validate(compose(overrides))
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    ref_losses = train_reference(reference, run, Prepared(run, 2).batches, 4)
    lines = metrics(out)
    trace_lines = [m for m in lines if "trace" in m]
    assert len(trace_lines) == 1 and trace_lines[0]["step"] == 3  # written once step 3 (the last traced) is done
    _plan_calibrated_by(out, overrides, trace_lines[0]["trace"])
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines if "loss" in m))
    losses_match(out, ref_losses, 4)  # tracing changes nothing that is computed

    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    for pid in (0, 1):
        mine = [e for e in spans if e["pid"] == pid]
        count = {n: sum(1 for e in mine if e["name"] == n) for n in CATEGORY}
        # 2 traced steps x 3 micro-batches of forward and backward; one optimizer step and loss broadcast each.
        assert count["ForwardPass"] == count["BackwardPass"] == 6, count
        assert count["OptimizerStep"] == count["ReduceGrads"] == count["AggregateLoss"] == 2, count
        assert count["SendActivation" if pid == 0 else "RecvActivation"] == 6
        assert count["RecvGrad" if pid == 0 else "SendGrad"] == 6
        assert count["LoadMicroBatch"] == 6  # the first stage loads inputs, the last one targets
        assert {e["args"]["step"] for e in mine} == {2, 3}
        assert sorted(e["name"] for e in mine if e["cat"] == "step") == ["step 2", "step 3"]
    # One clock: stage 1's first forward of a step starts after stage 0 sent that micro-batch.
    send = min(e["ts"] + e["dur"] for e in spans if e["pid"] == 0 and e["name"] == "SendActivation")
    fwd = min(e["ts"] for e in spans if e["pid"] == 1 and e["name"] == "ForwardPass")
    assert fwd >= send - 1e3  # within a millisecond
    row = trace_lines[0]["trace"]["stage1"]
    shares = sum(row[k] for k in ("compute", "communication", "optimizer", "data", "logging", "evaluation", "idle"))
    assert abs(shares - row["step_s"]) < 1e-3 and row["compute"] > 0 and row["communication"] > 0
    assert (out / "trace.png").stat().st_size > 10_000
    assert "trace stage 0: step" in (out / "train.log").read_text()


def _plan_calibrated_by(out: Path, overrides: list[str], trace: dict) -> None:
    """``pipefit plan --calibrate`` on this real traced run: its own split, priced and calibrated, spends the
    measured forward and backward seconds (summed over stages)."""
    import contextlib
    import io

    from pipefit.cli import main as cli_main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(["plan", *overrides, "--calibrate", str(out), "--json"]) == 0
    report = json.loads(printed.getvalue())
    cal, m = report["calibration"], report["micro_batches"]
    assert cal["forward"] > 0 and cal["backward"] > 0 and cal["optimizer"] > 0 and cal["reduce"] == 1.0  # dp=1
    stages = report["methods"][report["chosen"]]["stages"]
    for kind, names in (("forward_s", ["ForwardPass"]), ("backward_s", ["BackwardPass"])):
        measured = sum(trace[f"stage{s}"]["instructions"].get(n, 0.0) for s in range(len(stages)) for n in names)
        assert sum(m * st[kind] for st in stages) == pytest.approx(measured, rel=1e-6)
