"""Sharded engines against the single-process reference, on 2-rank gloo process groups (CPU).

All distributed work runs in three spawns, once per module (`runs` fixture); each test checks one
property of what they produced. Tolerances are the issue's: world-size invariance ≤ 1e-5
relative, resume bitwise at the same world size, ≤ 1e-6 across world sizes.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
MIXED_STEPS = 20  # the bf16-against-fp32 runs: long enough for rounding to compound
# The split model with every image path on: a coarse 2x2 span before each full grid, dual input
# (each masked span followed by its unmasked copy), and the diffusion head on fully masked spans.
FULL_SPLIT_MODEL = (
    "model.image_scales=[2]",
    "model.dual_input=true",
    "model.diffusion_head=true",
    "model.full_mask_prob=0.3",
)
SPAWN_TIMEOUT_S = 300


def overrides(demo_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={demo_data}",
        f"run.dir={run_dir}",
        # 16 samples a step on any world size; 256 tokens make the 1-rank run pack its 16
        # samples into more micro-batches than each of 2 ranks packs its 8.
        "data.global_batch_size=16",
        "data.max_tokens=256",
        f"run.steps={STEPS}",
        "optim.warmup_steps=2",
        "run.log_every=1000",
        "checkpoint.every=1",
        "checkpoint.keep_last=0",
        *extra,
    ]


def save_tiny_llm(out: Path, vocab_size: int) -> Path:
    """A random 4-layer Llama checkpoint in several safetensors shards (an index, like a 7B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(hf).save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def hf_tensor(checkpoint: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    with safe_open(str(checkpoint / index["weight_map"][name]), "pt") as file:
        return file.get_tensor(name)


def config(args: list[str]):
    return load_config(REPO / "yaml/tiny.yaml", args)


def losses(run_dir: Path, keys=("text_loss", "image_loss")) -> dict[int, tuple[float, ...]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: tuple(m[key] for key in keys) for m in map(json.loads, lines)}


def assert_close(got: dict, want: dict, rel: float, steps) -> None:
    for step in steps:
        for g, w in zip(got[step], want[step], strict=True):
            assert abs(g - w) <= rel * abs(w), (step, g, w, abs(g / w - 1))


# ---------------------------------------------------------------------------------------------
# Fixed micro-batches: one rank gets a text-only micro-batch and one with an image but nothing
# masked, so it skips the image paths the other rank runs.


def demo_documents(cfg, count: int = 40, seed: int = 1):
    from trainer.data.decode import SampleDecoder, load_tokenizer, tokenizer_dir
    from trainer.data.demo import make_sample
    from trainer.data.shards import pack_blobs

    decoder = SampleDecoder(
        load_tokenizer(tokenizer_dir(cfg.data)), cfg.model, cfg.data.max_tokens, seed=cfg.run.seed
    )
    rng = random.Random(seed)
    docs = []
    for index in range(count):
        sample = make_sample(index, rng)
        sample["images"] = pack_blobs(sample["images"])
        docs.append(decoder(sample, index))
    return docs


def split_micro_batches(cfg) -> list[list]:
    """Per rank of 2: rank 0 two micro-batches with masked images; rank 1 a text-only one and
    one whose image has no masked token."""
    from trainer.data.packing import collate

    docs = demo_documents(cfg)
    images = [d for d in docs if d.pixel_values.shape[0] and d.image_mask.any()]
    texts = [d for d in docs if d.pixel_values.shape[0] == 0]
    unmasked = images[3]
    unmasked.image_mask = torch.zeros_like(unmasked.image_mask)
    return [
        [collate(images[0:2]), collate(images[2:3])],
        [collate(texts[0:1]), collate([unmasked])],
    ]


def eval_micro_batches(cfg) -> list:
    from trainer.data.packing import collate

    return [collate(demo_documents(cfg, count=6, seed=2))]


# ---------------------------------------------------------------------------------------------
# Tasks run inside the spawned ranks; each returns something JSON can carry (rank 0's is kept).


def task_train(world, args: list[str]) -> dict:
    from trainer.loop import TrainLoop

    loop = TrainLoop(config(args), world)
    loop.run()
    return loop.engine.evaluate(eval_micro_batches(loop.cfg))


def task_train_and_report_dtypes(world, args: list[str]) -> dict:
    """Train, then run one more forward/backward and report the dtypes mixed precision must
    keep: the compute inside a block, the loss sums the model returns, and the sharded
    parameters, their gradients and the optimizer state (fp32 master copies, fp32 reduction)."""
    from trainer.loop import TrainLoop

    loop = TrainLoop(config(args), world)
    loop.run()
    model, optimizer = loop.engine.model, loop.engine.optimizer
    compute, loss_sums = set(), set()
    hooks = [
        model.core[0].mlp.register_forward_hook(lambda _m, _in, out: compute.add(str(out.dtype))),
        model.register_forward_hook(
            lambda _m, _in, out: loss_sums.update(str(v.dtype) for v in out.values())
        ),
    ]
    after = loop.engine.forward_backward(eval_micro_batches(loop.cfg))
    for hook in hooks:
        hook.remove()

    def dtype(tensor) -> str:
        return str(tensor.to_local().dtype if hasattr(tensor, "to_local") else tensor.dtype)

    optimizer_state: dict[str, set] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                optimizer_state.setdefault(key, set()).add(dtype(value))
    report = {
        "after": after,
        "compute": sorted(compute),
        "loss_sums": sorted(loss_sums),
        "params": sorted({dtype(p) for p in model.parameters()}),
        "grads": sorted({dtype(p.grad) for p in model.parameters() if p.grad is not None}),
        "optimizer_state": {key: sorted(dtypes) for key, dtypes in optimizer_state.items()},
    }
    optimizer.zero_grad(set_to_none=True)
    return report


def task_all_gathers(world, args: list[str]) -> dict:
    """The sizes FSDP all-gathers in one forward and backward: the vision tower's (gathered
    inside its forward) and every gather of the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainer.loop import TrainLoop

    loop = TrainLoop(config(args), world)
    tower = loop.engine.model.vision
    inside_tower = [False]
    sizes = {"tower": [], "backward": []}

    class Gathers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.c10d._allgather_base_.default:
                if torch._C._current_graph_task_id() != -1:  # in a backward
                    sizes["backward"].append(args[0].numel())
                elif inside_tower[0]:
                    sizes["tower"].append(args[0].numel())
            return func(*args, **(kwargs or {}))

    # In front of FSDP's own pre-forward hook, which gathers the unit.
    tower.register_forward_pre_hook(lambda *_: inside_tower.__setitem__(0, True), prepend=True)
    tower.register_forward_hook(lambda *_: inside_tower.__setitem__(0, False))
    with Gathers():
        loop.engine.forward_backward(eval_micro_batches(loop.cfg))
    return sizes


def task_train_in_two_parts(world, args: list[str], stop_after: int) -> None:
    from trainer.loop import train

    train(config([*args, f"run.steps={stop_after}"]), world)
    train(config(args), world)


def task_train_with_a_rank_of_skips(world, args: list[str]) -> None:
    """Rank 1 skips every sample (too long for its data.max_tokens), so each of its steps runs
    filler micro-batches only; rank 0 trains on its own samples (no balancing to share them)."""
    from trainer.loop import train

    train(config([*args, "data.balance_ranks=false", *(["data.max_tokens=2"] * world.rank)]), world)


def task_split_step(world, args: list[str]) -> dict:
    from trainer.loop import TrainLoop

    loop = TrainLoop(config(args), world)
    micro_batches = split_micro_batches(loop.cfg)[world.rank]
    before = loop.engine.forward_backward(micro_batches)
    grad_norm = loop.engine.step(1e-3)
    after = loop.engine.evaluate(micro_batches)
    return {"before": before, "grad_norm": grad_norm, "after": after}


def task_sample_ids(world, args: list[str], steps: int) -> list[list[str]]:
    from trainer.data.stream import StepBatches
    from trainer.distributed import all_gather_object

    data = step_batches(config(args), world, StepBatches)
    per_step = []
    for _ in range(steps):
        docs, _ = data.next_step()
        gathered = all_gather_object([d.sample_id for d in docs])
        per_step.append(sorted(i for ids in gathered for i in ids))
    return per_step


def task_balance(world, args: list[str]) -> dict:
    """Rank 0 starts with two thirds of the documents; balance_ranks over gloo evens them."""
    from trainer.data.packing import balance_ranks
    from trainer.distributed import all_gather_object

    docs = demo_documents(config(args), count=24)
    mine = docs[:16] if world.rank == 0 else docs[16:]
    before = all_gather_object(sum(d.num_tokens for d in mine))
    balanced = balance_ranks(mine, world.rank, all_gather_object)
    rows = [(d.sample_id, d.input_ids.tolist(), d.pixel_values.sum().item()) for d in balanced]
    return {"before": before, "after": all_gather_object(rows)}


def step_batches(cfg, world, cls):
    from trainer.data.decode import SampleDecoder, load_tokenizer, tokenizer_dir

    decoder = SampleDecoder(
        load_tokenizer(tokenizer_dir(cfg.data)), cfg.model, cfg.data.max_tokens, seed=cfg.run.seed
    )
    return cls(cfg.data, decoder, world)


def task_expect_incompatible(world, args: list[str]) -> str:
    from trainer.engines.base import IncompatibleCheckpointError
    from trainer.loop import train

    try:
        train(config(args), world)
    except IncompatibleCheckpointError as err:
        return str(err)
    return ""


TASKS = {
    "train": task_train,
    "train_and_report_dtypes": task_train_and_report_dtypes,
    "all_gathers": task_all_gathers,
    "train_with_a_rank_of_skips": task_train_with_a_rank_of_skips,
    "train_in_two_parts": task_train_in_two_parts,
    "split_step": task_split_step,
    "sample_ids": task_sample_ids,
    "balance": task_balance,
    "expect_incompatible": task_expect_incompatible,
}


def _worker(rank: int, world_size: int, init_file: str, tasks: list, out: str) -> None:
    from trainer.distributed import WorldInfo, world_info

    torch.set_num_threads(1)  # two ranks on two cores; more threads only spin
    # What torchrun or Ray Train would set; world_info() reads the local ranks from here.
    WorldInfo(rank, world_size, local_rank=rank, local_world_size=world_size).export_env()
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        world = world_info()
        results = {}
        for key, name, kwargs in tasks:
            results[key] = TASKS[name](world, **kwargs)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def seed_run(tmp: Path, source_run: str, step: int, run: str) -> None:
    """Start run directory `run` with `source_run`'s checkpoint of `step` (to resume it elsewhere)."""
    name = f"checkpoints/step_{step:07d}"
    (tmp / run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp / source_run / name, tmp / run / name)


def spawn(world_size: int, tasks: list, tmp: Path) -> dict:
    """Run `tasks` [(key, task name, kwargs)] on `world_size` ranks; rank 0's results by key."""
    out = tmp / f"results-{uuid.uuid4().hex}.json"
    init_file = tmp / f"pg-{uuid.uuid4().hex}"
    context = mp.start_processes(
        _worker,
        args=(world_size, str(init_file), tasks, str(out)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {SPAWN_TIMEOUT_S}s (a collective hangs?)")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(demo_data, native_demo_data, tmp_path_factory):
    """Everything distributed, once: three spawns plus the single-process references."""
    from trainer.data.decode import load_tokenizer, tokenizer_dir
    from trainer.data.stream import StepBatches
    from trainer.distributed import WorldInfo
    from trainer.engines.local import LocalEngine
    from trainer.loop import TrainLoop, build_training_model

    tmp = tmp_path_factory.mktemp("engines")
    timings = {}

    def args(name, *extra):
        return overrides(demo_data, tmp / name, *extra)

    def native_args(name, *extra):  # images at their own aspect ratio
        return overrides(native_demo_data, tmp / name, "model.vision.resize=native", *extra)

    # The split step also trains the vision tower (it gets zero gradients from the blank image
    # on the text-only micro-batch) and freezes part of a block (a sharded unit of mixed
    # trainable and frozen parameters).
    split_options = ("model.vision.trainable=true", "optim.freeze=[core.0.attn.*]")
    # Prefetching runs with loader workers only; the other runs read in turn.
    prefetch = "data.num_workers=1"
    started = time.perf_counter()
    # The reference: one process, local engine.
    # Two tokens fewer than ours: the rows the checkpoint lacks start at its mean row.
    llm = save_tiny_llm(tmp / "llm", len(load_tokenizer(demo_data / "tokenizer")) - 2)
    # Learning rate 0: the weights stay the checkpoint's, so the losses show what was loaded.
    pretrained = (f"model.pretrained_llm={llm}", "optim.lr=0", "run.steps=2")
    TrainLoop(config(args("pretrained_local", *pretrained)), WorldInfo()).run()
    local_loop = TrainLoop(config(args("local")), WorldInfo())
    local_loop.run()
    local_eval = local_loop.engine.evaluate(eval_micro_batches(local_loop.cfg))
    TrainLoop(config(args("local_prefetched", prefetch)), WorldInfo()).run()
    TrainLoop(config(native_args("native_local")), WorldInfo()).run()
    local_ids = []
    data = step_batches(config(args("local")), WorldInfo(), StepBatches)
    for _ in range(2):
        docs, _ = data.next_step()
        local_ids.append(sorted(d.sample_id for d in docs))
    del local_loop, data
    gc.collect()  # release the streaming datasets' shared memory before the ranks open theirs
    split_cfg = config(args("split_local", *split_options))
    split_cfg.model.vocab_size = len(load_tokenizer(tokenizer_dir(split_cfg.data)))
    engine = LocalEngine(
        split_cfg, WorldInfo(), build_training_model(split_cfg, None), torch.device("cpu")
    )
    micro_batches = [mb for rank in split_micro_batches(split_cfg) for mb in rank]
    split_local = {
        "before": engine.forward_backward(micro_batches),
        "grad_norm": engine.step(1e-3),
        "after": engine.evaluate(micro_batches),
    }
    timings["local"] = time.perf_counter() - started

    fsdp, ds = "engine.name=fsdp", "engine.name=deepspeed"
    ac = "engine.activation_checkpointing=true"
    started = time.perf_counter()
    first = spawn(
        2,
        [
            ("split_fsdp", "split_step", {"args": args("split_fsdp", fsdp, *split_options)}),
            ("ids", "sample_ids", {"args": args("ids"), "steps": 2}),
            ("balance", "balance", {"args": args("balance")}),
            ("gathers", "all_gathers", {"args": args("gathers", fsdp)}),
            ("fsdp", "train", {"args": args("fsdp", fsdp, ac)}),
            ("", "train", {"args": args("pretrained_fsdp", fsdp, *pretrained)}),
            ("", "train", {"args": native_args("native_fsdp", fsdp)}),
            ("", "train", {"args": args("fsdp_prefetched", fsdp, ac, prefetch)}),
            ("", "train_with_a_rank_of_skips", {"args": args("skips", fsdp, prefetch)}),
            (
                "",
                "train_with_a_rank_of_skips",
                {"args": args("skips_in_turn", fsdp)},
            ),
            ("", "train_in_two_parts", {"args": args("fsdp_resumed", fsdp, ac), "stop_after": 2}),
            ("bf16", "train", {"args": args("bf16", fsdp, "engine.mixed_precision=bf16")}),
            *(
                (
                    f"full_{precision}",
                    "train_and_report_dtypes",
                    {
                        "args": args(
                            f"full_{precision}",
                            fsdp,
                            *FULL_SPLIT_MODEL,
                            f"engine.mixed_precision={precision}",
                            f"run.steps={MIXED_STEPS}",
                            "checkpoint.every=1000",  # only the final one: nothing resumes
                        )
                    },
                )
                for precision in ("fp32", "bf16")
            ),
        ],
        tmp,
    )
    timings["spawn 1 (2 ranks)"] = time.perf_counter() - started

    # Resume the 2-rank FSDP run on one rank from its step 2 (DCP reshards 2 → 1).
    seed_run(tmp, "fsdp", 2, "fsdp_2to1")
    started = time.perf_counter()
    second = spawn(
        1,
        [
            ("", "train", {"args": args("fsdp_2to1", fsdp)}),
            ("", "train", {"args": args("ds_1rank", ds, "run.steps=2")}),
        ],
        tmp,
    )
    timings["spawn 2 (1 rank)"] = time.perf_counter() - started

    # ... and its 1-rank step 3 on two ranks again (1 → 2).
    seed_run(tmp, "fsdp_2to1", 3, "fsdp_1to2")
    seed_run(tmp, "ds_1rank", 2, "ds_other_world")
    started = time.perf_counter()
    third = spawn(
        2,
        [
            ("", "train", {"args": args("fsdp_1to2", fsdp)}),
            ("split_ds", "split_step", {"args": args("split_ds", ds, *split_options)}),
            ("ds", "train", {"args": args("ds", ds, ac)}),
            ("", "train_in_two_parts", {"args": args("ds_resumed", ds, ac), "stop_after": 2}),
            ("", "train", {"args": args("zero1", ds, "engine.zero_stage=1", "run.steps=2")}),
            ("", "train", {"args": args("zero2", ds, "engine.zero_stage=2", "run.steps=2")}),
            ("incompatible", "expect_incompatible", {"args": args("ds_other_world", ds)}),
        ],
        tmp,
    )
    timings["spawn 3 (2 ranks)"] = time.perf_counter() - started
    print("engine test timings (s):", {k: round(v, 1) for k, v in timings.items()})
    return {
        "tmp": tmp,
        "local_eval": local_eval,
        "local_ids": local_ids,
        "split_local": split_local,
        "second": second,
        **first,
        **third,
    }


def test_fsdp_and_deepspeed_on_2_ranks_match_local_step_for_step(runs):
    tmp = runs["tmp"]
    local = losses(tmp / "local")
    assert sorted(local) == list(range(1, STEPS + 1))
    for name in ("fsdp", "ds"):
        assert_close(losses(tmp / name), local, 1e-5, range(1, STEPS + 1))
    for name in ("zero1", "zero2", "ds_1rank"):
        assert_close(losses(tmp / name), local, 1e-5, (1, 2))
    # bf16 compute on CPU: close, not equal.
    assert_close(losses(tmp / "bf16"), local, 1e-2, range(1, STEPS + 1))


def test_fsdp_gathers_a_frozen_tower_for_its_forward_only(runs):
    # FSDP2 prefetches, at a block's backward, the unit that ran before the block's forward:
    # for a frozen tower that would be the whole tower gathered for nothing and held to the
    # backward's end (343 MB a rank at SigLIP-base).
    gathers = runs["gathers"]
    assert len(gathers["tower"]) == 1, gathers
    assert gathers["backward"], "no gather in the backward: the blocks' were not seen"
    assert gathers["tower"][0] not in gathers["backward"], gathers


def test_native_resolution_images_train_alike_on_local_and_2_fsdp_ranks(runs):
    """Shards of mixed aspect ratios → decode → the packed tower: the same losses sharded."""
    tmp = runs["tmp"]
    local = losses(tmp / "native_local")
    assert sorted(local) == list(range(1, STEPS + 1))
    assert_close(losses(tmp / "native_fsdp"), local, 1e-5, range(1, STEPS + 1))


def test_bf16_fsdp_trains_the_full_split_model_like_fp32_and_keeps_state_in_fp32(runs):
    # Multi-scale spans, dual input and the diffusion head on 2 FSDP ranks, 20 steps each way.
    keys = ("text_loss", "image_loss", "diffusion_loss")
    fp32, bf16 = (losses(runs["tmp"] / f"full_{p}", keys) for p in ("fp32", "bf16"))
    assert sorted(fp32) == sorted(bf16) == list(range(1, MIXED_STEPS + 1))
    assert_close(bf16, fp32, 0.03, range(1, MIXED_STEPS + 1))
    for key in ("text_loss", "image_loss", "diffusion_loss"):
        assert runs["full_bf16"]["after"][key] == pytest.approx(
            runs["full_fp32"]["after"][key], rel=0.03
        )
    for precision, compute in (("fp32", "torch.float32"), ("bf16", "torch.bfloat16")):
        report = runs[f"full_{precision}"]
        assert report["compute"] == [compute], precision  # bf16 did run in bf16
        # FSDP2's MixedPrecisionPolicy casts a copy for compute; what is kept stays fp32.
        assert report["loss_sums"] == ["torch.float32"], precision
        assert report["params"] == report["grads"] == ["torch.float32"], precision
        state = report["optimizer_state"]
        assert {"exp_avg", "exp_avg_sq"} <= set(state), precision
        assert all(dtypes == ["torch.float32"] for dtypes in state.values()), (precision, state)


def test_a_rank_with_text_only_micro_batches_neither_hangs_nor_changes_the_step(runs):
    want = runs["split_local"]
    for name in ("split_fsdp", "split_ds"):
        got = runs[name]
        for phase in ("before", "after"):
            for key in ("text_loss", "image_loss"):
                assert got[phase][key] == pytest.approx(want[phase][key], rel=1e-5), (name, key)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), name


def test_a_pretrained_llm_loaded_into_2_fsdp_shards_gives_the_local_losses(runs):
    from safetensors import safe_open

    tmp = runs["tmp"]
    local = losses(tmp / "pretrained_local")
    assert_close(losses(tmp / "pretrained_fsdp"), local, 1e-5, (1, 2))
    assert local != losses(tmp / "local")  # not the random init: the LLM was loaded
    weights = tmp / "pretrained_local/checkpoints/step_0000002/engine/model.safetensors"
    with safe_open(str(weights), "pt") as ours:
        core_q = ours.get_tensor("core.0.attn.wq.weight")  # the checkpoint's layer 1 (text-in: 0)
    assert torch.equal(core_q, hf_tensor(tmp / "llm", "model.layers.1.self_attn.q_proj.weight"))


def test_a_sharded_engine_builds_the_model_without_its_parameters_memory(tiny_overrides):
    from trainer.data.decode import load_tokenizer, tokenizer_dir
    from trainer.engines.materialize import build_engine_model

    cfg = config([*tiny_overrides, "engine.name=fsdp"])
    model, initial = build_engine_model(cfg, load_tokenizer(tokenizer_dir(cfg.data)))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    filled = [name for unit in initial.units() for name in unit]
    assert sorted(filled) == sorted(name for name, _ in model.named_parameters())  # once each


def test_prefetching_changes_no_loss_on_local_and_on_2_fsdp_ranks(runs):
    tmp = runs["tmp"]
    for prefetched, in_turn in (("local_prefetched", "local"), ("fsdp_prefetched", "fsdp")):
        assert losses(tmp / prefetched) == losses(tmp / in_turn)  # bitwise


def test_a_rank_whose_every_sample_is_skipped_neither_hangs_nor_changes_the_losses(runs):
    tmp = runs["tmp"]
    metrics = [json.loads(line) for line in (tmp / "skips/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["skipped_by_reason"] == {"too_long": 8} for m in metrics)
    assert losses(tmp / "skips") == losses(tmp / "skips_in_turn")


def test_a_step_sees_the_same_samples_on_1_and_2_ranks(runs):
    assert runs["ids"] == runs["local_ids"]
    assert len(runs["ids"][0]) == 16 and not set(runs["ids"][0]) & set(runs["ids"][1])


def test_resume_on_the_same_world_size_repeats_the_losses_exactly(runs):
    tmp = runs["tmp"]
    for straight, resumed in (("fsdp", "fsdp_resumed"), ("ds", "ds_resumed")):
        assert losses(tmp / resumed) == losses(tmp / straight)


def test_fsdp_checkpoints_reshard_between_2_and_1_ranks(runs):
    tmp = runs["tmp"]
    straight = losses(tmp / "fsdp")
    two_to_one = losses(tmp / "fsdp_2to1")
    assert sorted(two_to_one) == [3, 4]  # it resumed at step 2
    assert_close(two_to_one, straight, 1e-6, (3, 4))
    one_to_two = losses(tmp / "fsdp_1to2")
    assert sorted(one_to_two) == [4]
    assert_close(one_to_two, straight, 1e-6, (4,))


def test_deepspeed_on_another_world_size_says_how_to_continue(runs):
    message = runs["incompatible"]
    assert "partitioned over 1 workers" in message and "this run has 2" in message
    assert "cluster.num_workers=1" in message and "splitvlm export" in message
    assert "checkpoint.init_from" in message


def test_checkpoints_are_complete_and_loaded_without_unpickling(runs):
    step_dir = runs["tmp"] / "fsdp/checkpoints/step_0000004"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert "engine/.metadata" in manifest and {"rng_rank0.pt", "rng_rank1.pt"} <= set(manifest)
    assert json.loads((step_dir / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("name", ["local", "fsdp", "ds"])
def test_export_loads_in_models_and_gives_the_trained_engines_losses(
    runs, name, demo_data, tmp_path
):
    from models.split_vlm import SplitVLM
    from trainer.export import export_checkpoint

    export_checkpoint(runs["tmp"] / name, tmp_path / "export")  # the run's latest checkpoint
    assert (tmp_path / "export" / "tokenizer").is_dir()
    model = SplitVLM.from_pretrained(tmp_path / "export")  # no torch.distributed involved
    (micro_batch,) = eval_micro_batches(config(overrides(demo_data, tmp_path)))
    with torch.no_grad():
        out = model(micro_batch)
    text = float(out["text_loss_sum"]) / micro_batch.num_text_targets
    image = float(out["image_loss_sum"]) / micro_batch.num_masked_image_tokens
    want = runs["local_eval"] if name == "local" else runs[name]
    assert text == pytest.approx(want["text_loss"], rel=1e-6)
    assert image == pytest.approx(want["image_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Single-process checks.


def test_freeze_patterns_freeze_exactly_the_matched_parameters(tiny_overrides):
    from trainer.data.decode import load_tokenizer, tokenizer_dir
    from trainer.loop import build_training_model
    from trainer.optim import apply_freeze, build_optimizer, set_learning_rate

    cfg = config(
        [
            *tiny_overrides,
            "model.vision.trainable=true",
            "optim.vision_lr_scale=0.1",
            "optim.adaptor_lr_scale=10",
        ]
    )
    model = build_training_model(cfg, load_tokenizer(tokenizer_dir(cfg.data)))
    names = [n for n, _ in model.named_parameters()]
    # Stage 1 of LLaVA-style training: only the adaptor (and the mask embedding) learn.
    frozen = apply_freeze(model, ["*", "!adaptor.*", "!mask_embedding"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if n.startswith("adaptor.") or n == "mask_embedding"}
    assert set(frozen) == set(names) - trainable
    optimizer = build_optimizer(model, cfg.optim)
    assert {g["name"] for g in optimizer.param_groups} == {"adaptor_decay", "adaptor_no_decay"}
    set_learning_rate(optimizer, 1e-3)
    assert all(g["lr"] == pytest.approx(1e-2) for g in optimizer.param_groups)

    # Stage 2: everything but the vision tower and the first core block.
    for param in model.parameters():
        param.requires_grad_(True)
    apply_freeze(model, ["vision.*", "core.0.*"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in names if n.startswith(("vision.", "core.0."))}
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    assert "vision_decay" not in groups and groups["llm_decay"]["lr_scale"] == 1.0
    with pytest.raises(ValueError, match="'visoin.\\*' matches no parameter"):
        apply_freeze(model, ["visoin.*"])


@pytest.mark.parametrize(
    "preset, stage, trained",
    [
        ("yaml/tiny.yaml", "align", ("adaptor.", "mask_embedding")),
        ("yaml/tiny.yaml", "instruct", ("",)),  # everything but the tower
        ("yaml/tiny.yaml", "full", ("",)),
        ("yaml/janus.yaml", "align", ("adaptor.", "mask_embedding", "generation.")),
        ("yaml/janus.yaml", "full", ("",)),  # but its VQ-VAE: codes carry no gradient
        ("yaml/chameleon.yaml", "full", ("",)),  # but its VQ-VAE
    ],
)
def test_named_stages_train_exactly_their_components(demo_data, preset, stage, trained):
    """optim.stage trains the components it names, whatever model.vision.trainable says, and a
    VQ-VAE stays frozen; optim.freeze patterns still apply after it."""
    from trainer.data.decode import load_tokenizer, tokenizer_dir
    from trainer.loop import build_training_model

    overrides = [f"data.path={demo_data}", f"optim.stage={stage}", "optim.freeze=[]"]
    cfg = load_config(REPO / preset, overrides)
    model = build_training_model(cfg, load_tokenizer(tokenizer_dir(cfg.data), cfg.model))
    names = [n for n, _ in model.named_parameters()]
    never = ("vision.vqmodel.", "vision.encoder.", "vision.quant", "vision.post_quant")
    if stage != "full":
        never += ("vision.",)
    want = {n for n in names if n.startswith(trained) and not n.startswith(never)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert any(n.startswith("vision.") for n in want) == (stage == "full" and "cham" not in preset)
    frozen_too = load_config(REPO / preset, [*overrides[:2], "optim.freeze=[core.*]"])
    model = build_training_model(frozen_too, load_tokenizer(tokenizer_dir(cfg.data), cfg.model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in want if not n.startswith("core.")}


def test_frozen_parameters_do_not_move_in_training(tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    from models.split_vlm import SplitVLM
    from trainer.loop import train

    cfg = config([*tiny_overrides, "run.steps=2", "optim.freeze=[core.*, embed.weight]"])
    train(cfg)
    weights = load_file(
        str(Path(cfg.run.dir) / "checkpoints/step_0000002/engine/model.safetensors")
    )
    start = SplitVLM(cfg.model)
    start.reset_parameters(cfg.run.seed)  # the run's initial weights (trainer/engines/materialize)
    initial = start.state_dict()
    for name, value in weights.items():
        moved = not torch.equal(value, initial[name])
        assert moved == (not name.startswith(("core.", "embed.", "vision."))), name


def test_global_batch_size_divides_over_ranks():
    from trainer.config import DataConfig
    from trainer.data.stream import rank_batch_size

    assert rank_batch_size(DataConfig(batch_size=5), 2) == 5
    assert rank_batch_size(DataConfig(global_batch_size=16), 2) == 8
    with pytest.raises(ValueError, match="global_batch_size=15 does not divide over 2 workers"):
        rank_batch_size(DataConfig(global_batch_size=15), 2)


def test_dcp_metadata_that_names_other_code_is_refused(tmp_path):
    import pickle

    from trainer.engines.fsdp import SafeFileSystemReader

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_staged_training_starts_from_exported_weights_and_trains_only_the_unfrozen(
    tiny_overrides, tmp_path
):
    from safetensors.torch import load_file

    from trainer.export import export_checkpoint
    from trainer.loop import train

    first = config([*tiny_overrides, "run.steps=2", f"run.dir={tmp_path / 'stage1'}"])
    train(first)
    export_checkpoint(tmp_path / "stage1", tmp_path / "stage1_export")
    second = config(
        [
            *tiny_overrides,
            "run.steps=1",
            f"run.dir={tmp_path / 'stage2'}",
            f"checkpoint.init_from={tmp_path / 'stage1_export'}",
            "optim.freeze=['*', '!adaptor.*', '!mask_embedding']",
        ]
    )
    train(second)
    start = load_file(str(tmp_path / "stage1_export" / "model.safetensors"))
    end = load_file(str(tmp_path / "stage2/checkpoints/step_0000001/engine/model.safetensors"))
    for name, value in end.items():
        trained = name.startswith("adaptor.") or name == "mask_embedding"
        assert torch.equal(value, start[name]) != trained, name

    second.checkpoint.init_from = str(tmp_path / "nowhere")
    second.run.dir = str(tmp_path / "stage2b")
    with pytest.raises(ValueError, match="no model.safetensors"):
        train(second)


def test_export_of_something_else_is_a_one_line_usage_error(tmp_path, capsys):
    from cluster.cli import main

    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is neither a checkpoint" in err


def test_balance_ranks_moves_whole_documents_until_ranks_carry_even_tokens(runs, demo_data):
    before, after = runs["balance"]["before"], runs["balance"]["after"]
    assert max(before) / (sum(before) / 2) > 1.25  # rank 0 started with two thirds
    # Nothing lost, nothing duplicated, every document intact (tokens and pixels).
    docs = demo_documents(config(overrides(demo_data, runs["tmp"] / "balance")), count=24)
    want = [[d.sample_id, d.input_ids.tolist(), d.pixel_values.sum().item()] for d in docs]
    assert sorted(row for rank in after for row in rank) == sorted(want)
    tokens = [sum(len(row[1]) for row in rank) for rank in after]
    assert max(tokens) - min(tokens) <= max(len(row[1]) for row in want)
    assert max(tokens) / (sum(tokens) / 2) < 1.05
