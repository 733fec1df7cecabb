"""Per-step metrics beyond the losses: throughput, model FLOPs and MFU, data wait, rank token
imbalance, skipped samples, memory.

Model FLOPs come from the model's own count (models/flops.py).

MFU = model FLOPs of the step, all ranks / step seconds / (world size × peak FLOP/s per device).
"""

from __future__ import annotations

import resource
import sys
from collections import Counter

import torch

from models.flops import ModelFlops
from trainer.distributed import WorldInfo, all_gather_object

# Peak dense bf16 tensor-core FLOP/s per device (vendor data sheets, without 2:4 sparsity).
# Matched as a substring of torch.cuda.get_device_name(); the first match wins, so a name that
# contains another (H100 NVL ⊃ H100, A100 ⊃ A10, L40S ⊃ L4) comes first.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("B200", 2250e12),
    ("H200", 989e12),  # also matches GH200
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)


def peak_flops_for_name(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_FLOPS_PER_DEVICE if key in device_name), None)


def peak_flops_per_device(device: torch.device, override: float = 0.0) -> float | None:
    """`override` if set; else the table's value for this GPU; None on CPU or an unknown GPU."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


class StepMeter:
    """Turns one rank's view of a step into the step's global metrics (one collective)."""

    def __init__(self, flops: ModelFlops, world: WorldInfo, device: torch.device, peak: float = 0):
        self.flops = flops
        self.world = world
        self.device = device
        self.peak_flops = peak_flops_per_device(device, peak)
        if self.peak_flops is None and device.type == "cuda" and world.is_main:
            print(
                f"warning: no peak FLOP/s known for {torch.cuda.get_device_name(device)}; MFU is "
                "n/a (set logging.peak_flops_per_device)",
                file=sys.stderr,
            )

    def measure(self, data, wait_seconds: float, compute_seconds: float, seconds: float) -> dict:
        """The step's global metrics from this rank's `StepData` and timings: `wait_seconds`
        waiting for the data, `compute_seconds` in forward/backward and the optimizer step."""
        gpu_peak = None
        if self.device.type == "cuda":
            gpu_peak = torch.cuda.max_memory_allocated(self.device)
            # Per-step peaks: the next step's reading starts from what is allocated now.
            torch.cuda.reset_peak_memory_stats(self.device)
        local = {
            "tokens": sum(d.num_tokens for d in data.docs),
            "samples": len(data.docs),
            "flops": self.flops.step(data.micro_batches),
            "wait_seconds": wait_seconds,
            "host_seconds": seconds - compute_seconds,
            "skipped": Counter(s.reason for s in data.skipped),
            "gpu_peak": gpu_peak,
            "rss_peak": max_rss_bytes(),
        }
        ranks = all_gather_object(local)
        tokens = sum(r["tokens"] for r in ranks)
        flops = sum(r["flops"] for r in ranks)
        skipped_by_reason = sum((r["skipped"] for r in ranks), Counter())
        mean_tokens = tokens / len(ranks)
        mfu = None
        if self.peak_flops:
            mfu = flops / seconds / (self.world.world_size * self.peak_flops)
        return {
            "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_device": tokens / seconds / self.world.world_size,
            "samples_per_s": sum(r["samples"] for r in ranks) / seconds,
            "model_flops_per_token": flops / max(tokens, 1),
            "mfu": mfu,
            # The slowest rank's wait is what the step waited for.
            "data_wait_fraction": max(r["wait_seconds"] for r in ranks) / seconds,
            # Time on the training thread outside forward/backward/step: waiting for data,
            # copying, bookkeeping (the slowest rank's).
            "host_fraction": max(r["host_seconds"] for r in ranks) / seconds,
            "micro_batches": len(data.micro_batches),
            "token_imbalance": max(r["tokens"] for r in ranks) / mean_tokens if tokens else 1.0,
            "skipped": sum(skipped_by_reason.values()),
            "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
            "max_allocated_gb": (
                max(r["gpu_peak"] for r in ranks) / 2**30 if gpu_peak is not None else None
            ),
            "max_rss_gb": max(r["rss_peak"] for r in ranks) / 2**30,
            "tokens": tokens,
            "samples": sum(r["samples"] for r in ranks),
            "step_seconds": seconds,
        }
