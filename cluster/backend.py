"""The Ray Train backend of our jobs: Ray Train's generic data-parallel one, with GPUs shared the
way TorchTrainer shares them; the workers make the torch.distributed process group themselves
(`cluster.launch.init_process_group`). Its own module: importing it imports ray, which
`cluster.launch` must not do before it has chosen Ray's local-only mode."""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig


class WorkerDevices(Backend):
    # Every worker of a node sees all its GPUs, so the local rank picks one (as in TorchTrainer).
    share_cuda_visible_devices = True


@dataclass
class ProcessGroupConfig(BackendConfig):
    @property
    def backend_cls(self):
        return WorkerDevices
