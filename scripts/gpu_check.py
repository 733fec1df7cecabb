"""One-command GPU check (issue #14 item 6): attention backends, a 0.7B-class step, attention time.

Imports torch, transformers, numpy and this repository only (no ray, deepspeed, streaming, wandb).
On a CUDA machine, from the repository root (under 5 minutes on one H200):

    python scripts/gpu_check.py --out gpu_check.json

It prints one JSON object (also written to --out); "ok" is false, and the exit status 1, when a
check fails or errors. Sections, each skipped (and listed) once --budget-s is spent:
- attention: each backend available (varlen, flash if flash_attn imports, flex, sdpa, auto)
  against the fp32 dense reference on random packed layouts of text and image spans, output and
  q/k/v gradients, fp32 and bf16 (varlen, flash: bf16 only), max abs error, pass/fail; and direct
  `varlen_attn` calls with query and key lengths that differ in a batch (one batch without
  queries), causal (-1, 0), against the bottom-right mask: query i sees key j iff j <= i + sk - sq.
- model: forward + backward of a 0.7B split model (Qwen2-0.5B-shaped LLM as 1/22/1 blocks, one
  image-in and one image-head block, frozen SigLIP-base-shaped tower, random weights and data) in
  bf16 with activation checkpointing on packed 16k-token micro-batches: peak memory, median step
  time, tokens/s, model FLOPs and MFU. If the model's backend fails, sdpa is measured instead.
- attention_timing: forward + backward seconds per backend on scripts/bench_attention.py's mixes.
`--device cpu --tiny` runs it all small on the CPU backends (sdpa, auto, flash_emulated,
varlen_emulated): the script proven end to end without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_attention  # noqa: E402  (torch and models.attention only)

from models.attention import (  # noqa: E402
    PackedLayout,
    dense_reference_attention,
    packed_attention,
    varlen_attn_emulated,
)
from models.config import ModelConfig, VisionConfig  # noqa: E402
from models.flops import ModelFlops  # noqa: E402
from models.split_vlm import SplitVLM  # noqa: E402
from trainer.data.decode import Document  # noqa: E402  (numpy and PIL; no streaming)
from trainer.data.packing import collate  # noqa: E402
from trainer.engines.wrap import apply_activation_checkpointing  # noqa: E402  (no deepspeed)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HALF_ONLY = {"varlen", "flash"}  # flash-attn 2 kernels take fp16/bf16 only
# Pass: max abs error <= tolerance × max(1, max |reference|), per tensor (out, dq, dk, dv).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def backends_available(device: torch.device) -> dict[str, str | None]:
    """Backend → None where it runs here, else why not."""
    if device.type == "cpu":
        return dict.fromkeys(("sdpa", "auto", "flash_emulated", "varlen_emulated"))
    varlen = None if varlen_attn() else f"unavailable: torch {torch.__version__}"
    flash = None if importlib.util.find_spec("flash_attn") else "unavailable: no flash_attn"
    return {"varlen": varlen, "flash": flash, "flex": None, "sdpa": None, "auto": None}


def attention_shape(args) -> tuple[int, int, int]:
    return (4, 2, 16) if args.tiny else (14, 2, 64)  # heads, kv heads, head dim (Qwen2-0.5B)


def random_qkv(args, num_tokens: int, device, dtype, **options) -> list[torch.Tensor]:
    heads, kv_heads, head_dim = attention_shape(args)
    return [torch.randn(num_tokens, h, head_dim, device=device, dtype=dtype, **options)
            for h in (heads, kv_heads, kv_heads)]  # fmt: skip


def median_seconds(step, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    step()  # warm-up (and compilation, for flex)
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def error_text(error: Exception) -> str:
    return f"error: {type(error).__name__}: {error}"[:500]


def forward_backward(attend, inputs, grad_out) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of `attend(q, k, v)`, as fp32."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = attend(*leaves)
    return [t.float() for t in (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))]


def check(attend, reference, inputs: list[torch.Tensor]) -> dict:
    """`attend(q, k, v)` against `reference` run on fp32 copies: outputs and gradients."""
    grad_out = torch.randn(inputs[0].shape, device=inputs[0].device)
    want = forward_backward(reference, [t.float() for t in inputs], grad_out)
    try:
        got = forward_backward(attend, inputs, grad_out)
    except Exception as error:  # a backend that breaks is a finding, not the end of the run
        return {"status": error_text(error)}
    tolerance = TOLERANCE[inputs[0].dtype]
    errors = [(g - w).abs().max().item() for g, w in zip(got, want, strict=True)]
    passed = all(
        e <= tolerance * max(1.0, w.abs().max().item()) for e, w in zip(errors, want, strict=True)
    )
    return {
        "status": "pass" if passed else "fail",
        "max_abs_err": dict(zip(("out", "dq", "dk", "dv"), errors, strict=True)),
    }


def random_docs(rng: random.Random, num_tokens: int) -> list[list[tuple[str, int]]]:
    """About `num_tokens` of documents: one opening with multi-scale image spans, a one-token
    one, then random mixes of text runs and image spans (single or several in a row)."""
    scale = max(1, num_tokens // 1024)
    docs = [[("image", 4), ("image", 16), ("image", 64 * scale), ("text", 5)], [("text", 1)]]
    while sum(n for doc in docs for _, n in doc) < num_tokens:
        doc = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.4:
                doc += [("image", side * side) for side in rng.choice([[1], [4], [2, 8], [16]])]
            else:
                doc.append(("text", rng.randint(1, 96 * scale)))
        docs.append(doc)
    return docs


def attention_section(args, device, left) -> dict:
    heads, kv_heads, head_dim = attention_shape(args)
    num_tokens = 256 if args.tiny else 4096
    docs = [random_docs(random.Random(seed), num_tokens) for seed in range(3)]
    layouts = [PackedLayout.from_docs(d).to(device) for d in docs]
    checks = []
    for backend, missing in backends_available(device).items():
        for dtype_name, dtype in DTYPES.items():
            row = {"backend": backend, "dtype": dtype_name}
            if missing or (backend in HALF_ONLY and dtype == torch.float32):
                checks.append({**row, "status": missing or "unsupported"})
                continue
            # Full attention, and a sliding window shorter than most documents (Gemma 3's
            # local layers): the kernels' window_size on top of the per-segment decomposition.
            windows = (None, 16 if args.tiny else 256)
            for (number, layout), window in itertools.product(enumerate(layouts), windows):
                row.update(
                    layout=number, window=window, tokens=layout.num_tokens, tol=TOLERANCE[dtype]
                )
                if left() < 10:
                    checks.append({**row, "status": "skipped: budget"})
                    continue
                torch.manual_seed(number)
                qkv = random_qkv(args, layout.num_tokens, device, dtype)
                attend = functools.partial(
                    packed_attention, layout=layout, backend=backend, window=window
                )
                reference = functools.partial(
                    dense_reference_attention, layout=layout, window=window
                )
                checks.append({**row, **check(attend, reference, qkv)})
    kernel = varlen_attn() if device.type == "cuda" else varlen_attn_emulated
    direct = [
        {"kernel": getattr(kernel, "__name__", None), "heads": heads, "kv_heads": kv}
        | varlen_unequal(kernel, heads, kv, head_dim, device)
        for kv in (heads, kv_heads)
    ]
    return {"heads_kv_dim": attention_shape(args), "checks": checks, "varlen_direct": direct}


def varlen_unequal(kernel, heads: int, kv_heads: int, head_dim: int, device) -> dict:
    """`kernel` (varlen_attn's signature) in bf16, seqlen_q != seqlen_k in a batch, causal."""
    if kernel is None:
        return {"status": "unavailable: no torch.nn.attention.varlen"}
    lengths = [(7, 19), (1, 33), (0, 5), (64, 64), (100, 300), (3, 3), (130, 257)]
    query_lengths, key_lengths = zip(*lengths, strict=True)
    cu_q, cu_k = (np.cumsum([0, *n]).tolist() for n in (query_lengths, key_lengths))
    torch.manual_seed(0)
    q = torch.randn(cu_q[-1], heads, head_dim, device=device).bfloat16()
    k, v = (torch.randn(cu_k[-1], kv_heads, head_dim, device=device).bfloat16() for _ in "kv")
    gqa = {"enable_gqa": True} if heads != kv_heads else {}  # older varlen_attn: no such keyword
    cu_q_int32, cu_k_int32 = (
        torch.tensor(c, dtype=torch.int32, device=device) for c in (cu_q, cu_k)
    )

    def attend(q, k, v):
        max_q, max_k = max(query_lengths), max(key_lengths)
        return kernel(q, k, v, cu_q_int32, cu_k_int32, max_q, max_k, window_size=(-1, 0), **gqa)

    def reference(q, k, v):  # batch by batch: query i sees key j iff j <= i + sk - sq
        outputs = []
        for b, (sq, sk) in enumerate(lengths):
            q_b = q[cu_q[b] : cu_q[b + 1]]
            k_b, v_b = (
                t[cu_k[b] : cu_k[b + 1]].repeat_interleave(heads // kv_heads, 1) for t in (k, v)
            )
            scores = torch.einsum("qhd,khd->hqk", q_b, k_b) / math.sqrt(head_dim)
            query, key = torch.arange(sq, device=device), torch.arange(sk, device=device)
            visible = key[None, :] <= query[:, None] + sk - sq
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            outputs.append(torch.einsum("hqk,khd->qhd", probs, v_b))
        return torch.cat(outputs)

    return {
        "lengths_q_k": lengths,
        "tol": TOLERANCE[torch.bfloat16],
        **check(attend, reference, [q, k, v]),
    }


def model_config(tiny: bool, backend: str) -> ModelConfig:
    if tiny:
        return ModelConfig(vocab_size=1000, attention_backend=backend)
    # Qwen2-0.5B's shape (its 24 layers as text-in 1, core 22, text-head 1), SigLIP-base's.
    qwen2 = dict(vocab_size=151936, d_model=896, num_heads=14, num_kv_heads=2, mlp_hidden=4864)
    qwen2 |= dict(attention_bias=True, rope_theta=1e6, norm_eps=1e-6, num_core_blocks=22)
    siglip = dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12)
    return ModelConfig(**qwen2, attention_backend=backend, vision=VisionConfig(**siglip))


def random_micro_batch(cfg: ModelConfig, rng: np.random.Generator, num_tokens: int):
    """LLaVA-like documents (system text, an image, the answer), then a text document that fills
    the micro-batch to exactly `num_tokens`; random ids and pixels, each image masked at its own
    rate r ~ U(0, 1)."""
    docs, size, image_tokens = [], cfg.vision.image_size, cfg.num_image_tokens()
    while (room := num_tokens - sum(doc.num_tokens for doc in docs)) > 0:
        system, answer = int(rng.integers(16, 48)), int(rng.integers(16, 256))
        num_images = int(system + image_tokens + answer <= room)
        if not num_images:
            system, answer = 0, room
        spans = [rows * cols for (rows, cols), _ in cfg.image_spans()] * num_images
        mask = rng.random(num_images * image_tokens) < rng.random()
        span_full = [part.all() for part in np.split(mask, np.cumsum(spans)[:-1])] if spans else []
        length = system + num_images * image_tokens + answer
        docs.append(
            Document(
                sample_id=str(len(docs)),
                input_ids=torch.from_numpy(rng.integers(0, cfg.vocab_size, length)),
                target_mask=torch.from_numpy(np.arange(length) >= length - answer),
                segments=[("text", system)] * bool(system)
                + [("image", n) for n in spans]
                + [("text", answer)],
                pixel_values=torch.from_numpy(
                    rng.integers(0, 256, (num_images, 3, size, size), dtype=np.uint8)
                ),
                image_mask=torch.from_numpy(mask),
                image_span_full=torch.from_numpy(np.repeat(np.array(span_full, bool), spans)),
            )
        )
    return collate(docs, attention_backend=cfg.attention_backend)


def model_step(args, device, backend: str) -> dict:
    cfg = model_config(args.tiny, backend)
    torch.manual_seed(0)
    with torch.device(device):
        model = SplitVLM(cfg)
    # bf16 weights: what each FSDP rank computes with under engine.mixed_precision=bf16 (it
    # keeps fp32 masters and optimizer state beside them, which this check leaves out).
    model.to(DTYPES[args.dtype])
    flops_counter = ModelFlops(model)
    apply_activation_checkpointing(model.transformer_blocks())
    rng = np.random.default_rng(0)
    cpu_batches = [random_micro_batch(cfg, rng, args.tokens) for _ in range(args.micro_batches)]
    flops = flops_counter.step(cpu_batches)
    counts = [(max(b.num_text_targets, 1), max(b.num_masked_image_tokens, 1)) for b in cpu_batches]
    batches = [b.to(device) for b in cpu_batches]

    def step():  # the engine's: each micro-batch's losses over its targets, backward, no step
        for batch, (num_text, num_masked) in zip(batches, counts, strict=True):
            out = model(batch)
            (out["text_loss_sum"] / num_text + out["image_loss_sum"] / num_masked).backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, args.repeats, device)
    tokens = args.tokens * args.micro_batches
    on_gpu = device.type == "cuda"
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "activation_checkpointing": True,
        "micro_batches": args.micro_batches,
        "tokens_per_micro_batch": args.tokens,
        "images": sum(int(b.pixel_values.shape[0]) for b in cpu_batches),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "step_seconds_median": seconds,
        "tokens_per_s": tokens / seconds,
        "model_flops_per_step": flops,
        "mfu": flops / seconds / args.peak_flops if on_gpu else None,
    }


def model_section(args, device, left) -> dict:
    errors = {}
    for backend in dict.fromkeys((args.model_backend, "sdpa")):
        try:
            return {"attention_backend": backend, **model_step(args, device, backend), **errors}
        except Exception:
            errors[f"error_with_{backend}"] = "error: " + traceback.format_exc(limit=-4)[-2000:]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return errors


def attention_step(attend, inputs, layouts) -> None:
    for (q, k, v), layout in zip(inputs, layouts, strict=True):
        out = attend(q, k, v, layout)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def timing_section(args, device, left) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = [b for b, missing in backends_available(device).items() if not missing]
    backends = [b for b in backends if b != "auto"]  # auto is one of the others
    results = {}
    for index, (mix, draw_doc) in enumerate(bench_attention.MIXES.items()):
        rows = bench_attention.pack_rows(draw_doc, random.Random(index), args.rows, args.tokens)
        layouts = [PackedLayout.from_docs(row).to(device) for row in rows]
        torch.manual_seed(index)
        inputs = [
            random_qkv(args, lay.num_tokens, device, dtype, requires_grad=True) for lay in layouts
        ]
        seconds = {}
        for backend in backends:
            if left() < 10:
                seconds[backend] = "skipped: budget"
                continue
            attend = functools.partial(packed_attention, backend=backend)
            step = functools.partial(attention_step, attend, inputs, layouts)
            try:
                seconds[backend] = median_seconds(step, args.repeats, device)
            except Exception as error:
                seconds[backend] = error_text(error)
        timed = {b: s for b, s in seconds.items() if isinstance(s, float)}
        results[mix] = {
            "tokens": sum(lay.num_tokens for lay in layouts),
            "fwd_bwd_seconds": seconds,
            "speedup_over_sdpa": {b: timed.get("sdpa", math.nan) / s for b, s in timed.items()},
        }
    return {"dtype": str(dtype), "heads_kv_dim": attention_shape(args), "mixes": results}


def failures(value) -> list[str]:
    """Every failed check and every error in the results."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [found for item in value for found in failures(item)]
    failed = isinstance(value, str) and (value == "fail" or value.startswith("error: "))
    return [value] if failed else []


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 1k tokens (for CPU)")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--budget-s", type=float, default=240, help="start no section after this")
    parser.add_argument("--tokens", type=int, help="tokens per micro-batch (16384; tiny 1024)")
    parser.add_argument("--micro-batches", type=int, default=2, help="per model step")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per attention mix")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="model compute")
    parser.add_argument("--model-backend", default="auto", help="attention backend of the model")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="H200 dense bf16 peak")
    args = parser.parse_args()
    args.tokens = args.tokens or (1024 if args.tiny else 16384)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --tiny")
    started = time.monotonic()

    def left() -> float:
        return args.budget_s - (time.monotonic() - started)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": vars(args),
        "skipped": [],
    }
    sections = {
        "attention": attention_section,
        "model": model_section,
        "attention_timing": timing_section,
    }
    for name, section in sections.items():
        if left() < 20:
            result["skipped"].append(name)
            continue
        print(f"gpu_check: {name} ({left():.0f} s of budget left)", file=sys.stderr, flush=True)
        try:
            result[name] = section(args, device, left)
        except Exception:
            result[name] = {"error": "error: " + traceback.format_exc(limit=-4)[-2000:]}
    result["failures"] = failures(result)
    result["ok"] = not result["failures"]
    result["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
