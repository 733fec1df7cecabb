"""DeepSpeed ZeRO (stage 3 by default; 1 and 2 too) from a config generated out of ours.

The loop's step is one DeepSpeed accumulation boundary whatever its number M of micro-batches:
`managed_gradient_accumulation: false` makes `backward()` only accumulate and `step()` reduce and
update, and gradient_accumulation_steps=1 keeps DeepSpeed from rescaling the loss (base.py
normalizes it by global target counts already).

Checkpoints are DeepSpeed's own (per-rank ZeRO partitions). They are read with
torch.load(weights_only=True) plus the few DeepSpeed classes its files name, never with a full
unpickler. ZeRO partitions are tied to the world size that wrote them; loading on another one
raises IncompatibleCheckpointError saying how to continue.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from trainer.config import ZERO_STAGES, Config
from trainer.distributed import WorldInfo, ensure_process_group
from trainer.engines.base import Engine, IncompatibleCheckpointError
from trainer.engines.materialize import fill_zero3
from trainer.engines.wrap import parallelize, resolve_precision
from trainer.optim import build_optimizer, hyperparameters_from_config, set_learning_rate

META_FILE = "splitvlm_engine.json"
ZERO_BUFFER_ELEMENTS = 50_000_000  # 200 MB in fp32


def deepspeed_config(cfg: Config, device: torch.device) -> dict:
    engine = cfg.engine
    assert engine.zero_stage in ZERO_STAGES, f"unvalidated engine.zero_stage={engine.zero_stage}"
    zero: dict = {"stage": engine.zero_stage}
    if engine.zero_stage == 1:
        zero["overlap_comm"] = False  # required by unmanaged accumulation below stage 2
    # DeepSpeed's buffer defaults are counts of elements sized for GPUs of 40+ GB: a 500M-element
    # gradient bucket (2 GB in fp32), up to 1e9 gathered parameters live at once and 1e9-element
    # optimizer sub-groups. Bounded to ZERO_BUFFER_ELEMENTS, a rank's memory is its partitions
    # plus a few hundred MB, so ZeRO-3 fits where the sharding says it should.
    zero.update(
        reduce_bucket_size=ZERO_BUFFER_ELEMENTS,
        allgather_bucket_size=ZERO_BUFFER_ELEMENTS,
    )
    if engine.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ZERO_BUFFER_ELEMENTS,
            stage3_max_live_parameters=2 * ZERO_BUFFER_ELEMENTS,
            stage3_max_reuse_distance=2 * ZERO_BUFFER_ELEMENTS,
            sub_group_size=2 * ZERO_BUFFER_ELEMENTS,
        )
    if engine.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if engine.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        # DeepSpeed's batch bookkeeping is unused: the packer decides what a micro-batch is.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(engine.mixed_precision, device) == torch.bfloat16},
        # Our torch AdamW with its parameter groups (decay, learning-rate scales).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    def __init__(
        self, cfg: Config, world: WorldInfo, model: nn.Module, device: torch.device, initial=None
    ):
        super().__init__(cfg, world)
        assert not cfg.engine.compile, "unvalidated engine.compile with engine.name=deepspeed"
        if cfg.engine.cpu_offload and device.type != "cuda":
            raise ValueError("engine.cpu_offload moves GPU state to host memory; it needs a GPU")
        ensure_process_group(world)
        world.export_env()  # DeepSpeed reads LOCAL_RANK and friends from the environment
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.stage = cfg.engine.zero_stage
        model.run_every_branch = True
        if initial is not None:  # built partitioned (ZeRO-3): fill the partitions unit by unit
            fill_zero3(model, initial, world.rank)
        # torch's non-reentrant checkpointing re-runs each block's forward in backward, and with
        # it ZeRO-3's gather hooks, so it needs no DeepSpeed-specific variant.
        parallelize(model, cfg.engine)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, cfg.optim),
            config=deepspeed_config(cfg, device),
            dist_init_required=False,
        )
        _make_loads_safe(self.ds.checkpoint_engine)
        self.model = self.ds.module
        self.optimizer = self.ds.optimizer

    def forward(self, micro_batch) -> dict[str, torch.Tensor]:
        return self.ds(micro_batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self, lr: float) -> float:
        set_learning_rate(self.ds.optimizer, lr)
        self.ds.step()  # reduces, clips, updates and zeroes the gradients
        grad_norm = self.ds.get_global_grad_norm()
        return float("nan") if grad_norm is None else float(grad_norm)

    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        if self.world.is_main:
            meta = {"world_size": self.world.world_size, "zero_stage": self.stage}
            (path / META_FILE).write_text(json.dumps(meta))

    def load(self, path: Path) -> None:
        meta = json.loads((path / META_FILE).read_text())
        if (meta["world_size"], meta["zero_stage"]) != (self.world.world_size, self.stage):
            step_dir = path.parent
            raise IncompatibleCheckpointError(
                f"{step_dir} holds DeepSpeed ZeRO-{meta['zero_stage']} state partitioned over "
                f"{meta['world_size']} workers; this run has {self.world.world_size} workers and "
                f"ZeRO-{self.stage}. Resume with cluster.num_workers={meta['world_size']} and "
                f"engine.zero_stage={meta['zero_stage']}, or keep the weights and restart the "
                f"optimizer: splitvlm export {step_dir} --out DIR, then train a new run with "
                "--set checkpoint.init_from=DIR"
            )
        with hyperparameters_from_config(self.ds.optimizer):
            loaded, _ = self.ds.load_checkpoint(
                str(path.parent),
                tag=path.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        if loaded is None:
            raise OSError(f"DeepSpeed found no checkpoint in {path}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.stage == 3):
            if not self.world.is_main:
                return {}
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def memory_bytes(self) -> dict[str, int]:
        zero = self.ds.optimizer
        # ZeRO-3 keeps each rank's slice of a parameter in `ds_tensor`; stages 1 and 2 keep whole
        # parameters. The fp32 master partitions are optimizer state (a copy even in fp32).
        params = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        masters = getattr(zero, "fp32_partitioned_groups_flat", None)
        if masters is None:
            masters = getattr(zero, "single_partition_of_fp32_groups", [])
        moments = [
            value
            for state in zero.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        ]

        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        return {"param_bytes": size(params), "optimizer_bytes": size(masters) + size(moments)}


def _make_loads_safe(checkpoint_engine) -> None:
    """Switch DeepSpeed's checkpoint engine (keeping its settings) to weights-only loading."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    assert type(checkpoint_engine) is TorchCheckpointEngine, type(checkpoint_engine)
    checkpoint_engine.__class__ = SafeTorchCheckpointEngine


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor classes DeepSpeed's checkpoint files contain: an enum and the loss scaler's
    plain record of numbers (no custom unpickling logic)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]
