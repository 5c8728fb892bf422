"""ZeRO-1 at dp=1 without the reduction copies: the same training to the bit (pipefit.run.zero_dp1)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from pipefit.run.zero_dp1 import dp1_direct_eligible, install_dp1_direct_gradients

deepspeed = pytest.importorskip("deepspeed")


def _engine(direct: bool, clip: float = 0.05) -> Any:
    """A one-stage pipeline (DeepSpeed's PipelineEngine, which reduces with ``pipeline_parallel=True``)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    torch.manual_seed(0)
    # A bias-free and a biased layer, a norm: two parameter groups (decay, no decay) as pipefit builds.
    layers = [torch.nn.Linear(24, 48, bias=False), torch.nn.GELU(), torch.nn.LayerNorm(48), torch.nn.Linear(48, 24)]
    module = PipelineModule(
        layers=layers,
        topology=PipeDataParallelTopology(num_pp=1, num_dp=1),
        loss_fn=lambda out, target: (out - target).pow(2).mean(),
    )
    named = list(module.named_parameters())
    groups = [
        {"params": [p for _, p in named if p.ndim > 1], "weight_decay": 0.1},
        {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0},
    ]
    cfg = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 500, "allgather_bucket_size": 500},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=module, config=cfg, model_parameters=groups)
    if direct:
        assert install_dp1_direct_gradients(engine)
    return engine


def _count(opt: Any, name: str, calls: dict[int, int], key: int) -> None:
    inner = getattr(opt, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[key] += 1
        return inner(*args, **kwargs)

    setattr(opt, name, counted)


def _train(engine: Any, steps: int) -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for _ in range(steps):
        batch = []
        for _ in range(2):  # micro-batches
            x = torch.randn(4, 24, generator=g)
            batch.append((x, x.flip(1)))
        losses.append(engine.train_batch(data_iter=iter(batch)).item())
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


@pytest.fixture
def group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import torch.distributed as dist

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()


def _state(engine: Any) -> dict[str, torch.Tensor]:
    opt = engine.optimizer
    out = {f"model.{n}": p.detach().clone() for n, p in engine.module.named_parameters()}
    for i, flat in enumerate(opt.single_partition_of_fp32_groups):
        out[f"master.{i}"] = flat.detach().clone()
        for k, v in opt.optimizer.state[flat].items():
            out[f"state.{i}.{k}"] = torch.as_tensor(v).clone()
    return out


def test_direct_gradients_train_bit_for_bit_as_deepspeed(group: Any, tmp_path: Path) -> None:
    base, fast = _engine(direct=False), _engine(direct=True)
    calls = {id(base): 0, id(fast): 0}
    for engine in (base, fast):  # the bucket reduction and the copy into the gradient partition
        for name in ("average_tensor", "copy_grads_in_partition"):
            _count(engine.optimizer, name, calls, id(engine))
    base_losses, base_norms = _train(base, 4)
    fast_losses, fast_norms = _train(fast, 4)
    assert fast_losses == base_losses
    assert fast_norms == base_norms and all(n > 0.05 for n in base_norms)  # clipping engaged every step
    a, b = _state(base), _state(fast)
    assert a.keys() == b.keys() and len(a) > 8
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # DeepSpeed reduced (over the group of one) and copied; the direct path did neither.
    assert calls[id(fast)] == 0 and calls[id(base)] > 8
    # fp32: the master partition is the model's flat weights (DeepSpeed's copy after the step is a no-op),
    # and the fp32 fragments DeepSpeed links to each parameter read that storage.
    shared = [
        m.data_ptr() == parts[0].data_ptr()
        for e in (base, fast)
        for m, parts in zip(
            e.optimizer.single_partition_of_fp32_groups, e.optimizer.parallel_partitioned_bit16_groups, strict=True
        )
    ]
    assert shared == [False, False, True, True]
    from deepspeed.utils import safe_get_full_fp32_param

    for p in fast.module.parameters():
        assert torch.equal(safe_get_full_fp32_param(p), p.detach())

    # Checkpoints load both ways and continue identically.
    base.save_checkpoint(str(tmp_path / "base"), tag="t")
    fast.save_checkpoint(str(tmp_path / "fast"), tag="t")
    base.load_checkpoint(str(tmp_path / "fast"), tag="t")
    fast.load_checkpoint(str(tmp_path / "base"), tag="t")
    assert _train(base, 2) == _train(fast, 2)
    a, b = _state(base), _state(fast)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # Only where DeepSpeed's reduction would only copy. (Checked here, on engines already built:
    # DeepSpeed keeps the groups it derives globally, so one process group serves this whole file.)
    opt = base.optimizer
    assert dp1_direct_eligible(opt) is None
    opt.overlap_comm = True
    assert dp1_direct_eligible(opt) == "overlap_comm=True"
    opt.overlap_comm = False
    opt.gradient_accumulation_dtype = torch.float64
    assert "gradients accumulated in torch.float64" in str(dp1_direct_eligible(opt))
    assert not install_dp1_direct_gradients(base)
    assert dp1_direct_eligible(object()) == "optimizer is object"


def test_deepspeed_zero1_internals_the_direct_path_relies_on() -> None:
    """The private DeepSpeed API of pipefit.run.zero_dp1: names, and what the replaced method ends with."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z

    for name in (
        *("get_all_grad_tensors", "get_flat_partition", "_clear_param_grad_only", "_is_muon_group"),
        "_link_all_hp_params",
    ):
        assert callable(getattr(Z, name)), name
    epilogue = inspect.getsource(Z.independent_gradient_partition_epilogue)
    for line in (
        "self.all_grad_tensors[i] = self.get_all_grad_tensors(self.params_in_partition[i]",
        "self.averaged_gradients[i] = self.get_flat_partition(",
        "return_tensor_list=True)",
        "self.all_grad_tensors[i] = None",
        "self._clear_param_grad_only()",
        "self._epilogue_ran_this_backward = True",
    ):
        assert line in epilogue, line
    reduce = inspect.getsource(Z.reduce_gradients)
    assert "self.reduce_ready_partitions_and_remove_grads(param, i)" in reduce
    assert "self.overlapping_partition_gradients_reduce_epilogue()" in reduce
    step = inspect.getsource(Z.step)
    assert "self.flatten_dense_tensors_aligned(self.averaged_gradients[i]" in step
    assert "bit16_partitions[partition_id].data.copy_(fp32_partition.data)" in step
    assert "flat_hp_partition = self.single_partition_of_fp32_groups[i]" in inspect.getsource(Z._link_all_hp_params)
    init = inspect.getsource(Z.__init__)
    for attr in ("self.use_grad_accum_attribute", "self.communication_data_type", "self.gradient_accumulation_dtype"):
        assert attr in init, attr
