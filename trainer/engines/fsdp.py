"""FSDP2: `fully_shard` per transformer block, the vision tower and the root; DCP checkpoints.

Checkpoints are torch.distributed.checkpoint (DCP) directories of sharded tensors, so a run saved
on N workers resumes on M (DCP reshards on load). Only tensors are stored — the optimizer's
hyperparameters come from the config — and loading reads DCP's metadata with an unpickler that
admits DCP's own metadata classes only, so no checkpoint can run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from trainer.config import Config
from trainer.distributed import WorldInfo, ensure_process_group
from trainer.engines.base import Engine, clip_and_step
from trainer.engines.materialize import materialize_fsdp
from trainer.engines.vocab_parallel import shard_vocabulary
from trainer.engines.wrap import parallelize, resolve_precision
from trainer.optim import build_optimizer, set_learning_rate


class FSDPEngine(Engine):
    def __init__(
        self, cfg: Config, world: WorldInfo, model: nn.Module, device: torch.device, initial=None
    ):
        super().__init__(cfg, world)
        ensure_process_group(world)
        self.device = device
        engine_cfg = cfg.engine
        if engine_cfg.cpu_offload and device.type != "cuda":
            raise ValueError("engine.cpu_offload moves GPU state to host memory; it needs a GPU")
        param_dtype = resolve_precision(engine_cfg.mixed_precision, device)
        mesh = init_device_mesh(device.type, (world.world_size,))
        model.run_every_branch = True
        units = {
            "mesh": mesh,
            # Gradients are reduced in fp32 whatever the compute dtype.
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy() if engine_cfg.cpu_offload else OffloadPolicy(),
        }

        # The embedding and the LM head split by rows over the ranks, outside FSDP
        # (trainer/engines/vocab_parallel.py), but for a vocabulary that holds image codes (Chameleon's),
        # whose lookups and losses a rank without images would not run.
        rows = set()
        if engine_cfg.vocab_parallel and model.cfg.adaptor != "vocabulary":
            rows = shard_vocabulary(model, mesh, param_dtype)

        def shard(model: nn.Module) -> None:
            for block in model.transformer_blocks():
                fully_shard(block, **units)
            # The vision tower is its own unit because it is usually frozen: FSDP2
            # reduce-scatters a unit's gradients together, and a unit of only frozen parameters
            # simply has none to reduce, while its weights are still sharded (half the memory on
            # 2 ranks) and gathered for its forward. The adaptor, mask embedding, norms and
            # image heads are small and go with the root, gathered once per forward.
            fully_shard(model.vision, **units)
            # A frozen tower has no backward, but FSDP2 prefetches the unit that ran before a
            # block's forward when that block's backward starts: the whole tower (343 MB at
            # SigLIP-base) would be gathered there and held to the backward's end.
            if not any(p.requires_grad for p in model.vision.parameters()):
                model.vision.set_unshard_in_backward(False)
            # The embedding and the LM head are units of their own: at a 150k vocabulary each is
            # as large as several blocks, and in the root they would stay gathered, with their
            # whole gradients, through the entire forward and backward. Tied, they are one
            # parameter, which must stay in one unit: the root's.
            if rows:
                fully_shard(model, **units, ignored_params=rows)
                return
            if not model.cfg.tie_embeddings:
                for vocabulary_matrix in (model.embed, model.lm_head):
                    fully_shard(vocabulary_matrix, **units)
                    # Neither backward reads its weight (a lookup; the LM head's gradients are
                    # made in its forward, models/lm_head.py): no second gather of the matrix.
                    vocabulary_matrix.set_unshard_in_backward(False)
            fully_shard(model, **units)

        parallelize(model, engine_cfg, shard)
        if initial is not None:  # built on meta: allocate and fill this rank's shards only
            materialize_fsdp(model, initial, device)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim)

    def backward(self, loss: torch.Tensor) -> None:
        # Gradients are reduce-scattered after every micro-batch (not only the last): that keeps
        # only sharded gradients in memory, which is what FSDP is for.
        loss.backward()

    def step(self, lr: float) -> float:
        set_learning_rate(self.optimizer, lr)
        return clip_and_step(self.model, self.optimizer, self.cfg.optim.grad_clip)

    def _sharded_state(self) -> tuple[dict, dict]:
        # Initializes empty optimizer state (a zero-lr step) so a fresh run has tensors to load
        # into; DCP then loads in place, resharding to this world size. Only the per-parameter
        # state is saved: group hyperparameters come from the config (as in the other engines).
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return model_state, optimizer_state

    def save(self, path: Path) -> None:
        model_state, optimizer_state = self._sharded_state()
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state["state"]},
            checkpoint_id=str(path),
        )

    def load(self, path: Path) -> None:
        model_state, optimizer_state = self._sharded_state()
        dcp.load(
            {"model": model_state, "optimizer": optimizer_state["state"]},
            checkpoint_id=str(path),
            storage_reader=SafeFileSystemReader(str(path)),
            planner=TensorsOnlyLoadPlanner(),
        )
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=optimizer_state,
        )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )


# DCP metadata is a pickle of its metadata dataclasses, the file system's storage records,
# torch sizes, dtypes and layouts, and a path.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a tensor layout up by name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib._local", "PosixPath"),  # Python 3.13+
    ("pathlib._local", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "tuple"),
    ("builtins", "slice"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}; refused")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata unpickling admits DCP's metadata classes only."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            data = stream.read()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        # What FileSystemReader.read_metadata does after unpickling.
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """Tensors are read with torch.load(weights_only=True); DCP's non-tensor items would be
    unpickled without restriction, and our checkpoints never contain any."""

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(
            f"checkpoint item {read_item.dest_index.fqn!r} is not a tensor; refusing to unpickle it"
        )
