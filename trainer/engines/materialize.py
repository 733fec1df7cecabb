"""Build the model the way its engine needs it, and give a sharded model its first weights.

- `local` (and ZeRO stages 1 and 2, which keep whole parameters on every rank) build the model
  on the CPU and initialize it there.
- `fsdp` builds it with its parameters on the meta device (`models.meta.parameters_on_meta`),
  applies activation checkpointing → compile → `fully_shard`, then allocates only this rank's
  shards and fills them.
- `deepspeed` ZeRO-3 builds it inside `deepspeed.zero.Init`, which partitions every parameter as
  its module is constructed, then fills the partitions.

Filling goes unit by unit (`SplitVLM.init_units`: a transformer block, the vision tower, …):
the unit's initial values are drawn on the CPU from its own seed (`unit_initial_values`), then
replaced where `checkpoint.init_from` or the pretrained LLM has the tensor, which is read tensor
by tensor (a shard's rows only, where a rank needs only those). So a rank never holds more than
its shards plus one unit, and the first step of a sharded run equals a single-process run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from models.meta import parameters_on_meta, weights_filled_later
from models.pretrained import build_split_vlm
from models.split_vlm import SplitVLM
from trainer.config import Config
from trainer.optim import apply_freeze, apply_stage


class SafetensorsWeights:
    """Weights written by `splitvlm export` (`checkpoint.init_from`), read tensor by tensor."""

    def __init__(self, path: Path, expected: set[str]):
        self.file = Path(path) / "model.safetensors"
        if not self.file.is_file():
            raise ValueError(
                f"checkpoint.init_from={path}: no model.safetensors "
                "(write one with `splitvlm export CHECKPOINT --out DIR`)"
            )
        with safe_open(str(self.file), framework="pt") as reader:
            self.names = set(reader.keys())
        missing, unexpected = sorted(expected - self.names), sorted(self.names - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint.init_from={path} does not fit model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as reader:
            if rows is None:
                return reader.get_tensor(name)
            return reader.get_slice(name)[rows]


class InitialWeights:
    """Every parameter's first value, unit by unit: its unit's seeded init, or a source's tensor
    (later sources win)."""

    def __init__(self, template: SplitVLM, seed: int, sources: list):
        self.template = template  # the model's structure, parameters on meta
        self.seed = seed
        self.sources = sources

    def units(self) -> Iterator[dict[str, tuple[torch.Tensor, object]]]:
        """Per unit: parameter name → (its initial value, the source that replaces it or None).
        Only the model's own parameters (a tied weight once, under its owner)."""
        names = {name for name, _ in self.template.named_parameters()}
        for unit in self.template.init_units():
            module = self.template.get_submodule(unit) if unit else None
            own = (
                [f"{unit}.{name}" for name, _ in module.named_parameters()]
                if module is not None
                else [name for name, _ in self.template.named_parameters(recurse=False)]
            )
            own = [name for name in own if name in names]
            sources = {
                name: next((s for s in reversed(self.sources) if name in s.names), None)
                for name in own
            }
            # A unit the sources cover entirely is never drawn: no full copy of, say, a
            # 150k-row embedding just to be replaced by the checkpoint's rows.
            if all(source is not None for source in sources.values()):
                yield {name: (None, source) for name, source in sources.items()}
                continue
            values = self.template.unit_initial_values(unit, self.seed)
            yield {name: (values[name], sources[name]) for name in own}

    @staticmethod
    def value(entry: tuple[torch.Tensor, object], name: str, rows: slice | None = None):
        init, source = entry
        if source is None:
            return init if rows is None else init[rows]
        return source.read(name, rows)


def builds_empty(cfg: Config) -> bool:
    """Whether the engine builds the model without its parameters' memory (and fills it)."""
    return cfg.engine.name == "fsdp" or (
        cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3
    )


def construction(cfg: Config, device: torch.device):
    """Where the engine wants the model's parameters created."""
    if cfg.engine.name == "fsdp":
        return parameters_on_meta()
    if cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3:
        import deepspeed
        from transformers.modeling_utils import no_init_weights

        stack = contextlib.ExitStack()
        # Partitioned as each module is constructed; filled afterwards (`fill_zero3`). The
        # vision tower's own init would run on the empty partitions: it is skipped.
        from trainer.engines.deepspeed import deepspeed_config

        # The dtype comes from the engine's config: zero.Init's own `dtype` argument is ignored
        # on accelerators without fp16 (deepspeed 0.19: the CPU's, which then gives bf16).
        config = deepspeed_config(cfg, device)
        # mem_efficient_linear would replace torch.nn.functional.linear for the whole process
        # (and sum weight gradients in another order than the other engines).
        init = deepspeed.zero.Init(config_dict_or_path=config, mem_efficient_linear=False)
        stack.enter_context(init)
        stack.enter_context(no_init_weights())
        stack.enter_context(weights_filled_later())
        return stack
    return contextlib.nullcontext()


def build_engine_model(
    cfg: Config, tokenizer, device: torch.device | None = None
) -> tuple[SplitVLM, InitialWeights | None]:
    """The model for `cfg.engine`, frozen as configured. Single-device engines get it
    initialized (None for the weights); sharded ones get it empty plus its `InitialWeights`."""
    if cfg.model.vocab_size <= 0:
        cfg.model.vocab_size = len(tokenizer)
    if cfg.model.adaptor == "vocabulary" and cfg.model.image_vocab_start < 0:
        # A VQ tokenizer's codes get the rows after the tokenizer's vocabulary.
        cfg.model.image_vocab_start = cfg.model.vocab_size
        cfg.model.vocab_size += cfg.model.vision.codebook_size
    if not builds_empty(cfg):
        torch.manual_seed(cfg.run.seed)  # what the constructor draws; every value is reset below
        model = build_split_vlm(cfg.model, seed=cfg.run.seed)
        if cfg.checkpoint.init_from:
            expected = {name for name, _ in model.named_parameters()}
            source = SafetensorsWeights(Path(cfg.checkpoint.init_from), expected)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(source.read(name))
        apply_stage(model, cfg.optim.stage)
        apply_freeze(model, cfg.optim.freeze)
        return model, None
    with parameters_on_meta():
        template = build_split_vlm(cfg.model, seed=cfg.run.seed, load_weights=False)
    sources = list(pretrained_sources(template))
    if cfg.checkpoint.init_from:
        expected = {name for name, _ in template.named_parameters()}
        sources.append(SafetensorsWeights(Path(cfg.checkpoint.init_from), expected))
    # Created only now: deepspeed.zero.Init hooks module construction from its own __init__ on.
    with construction(cfg, device or torch.device("cpu")):
        model = build_split_vlm(cfg.model, seed=cfg.run.seed, load_weights=False)
    apply_stage(model, cfg.optim.stage)
    apply_freeze(model, cfg.optim.freeze)
    return model, InitialWeights(template, cfg.run.seed, sources)


def pretrained_sources(template: SplitVLM) -> list:
    """The pretrained LLM's weights, read tensor by tensor (none without model.pretrained_llm)."""
    if not template.cfg.pretrained_llm:
        return []
    from models.pretrained import PretrainedLLM

    return [PretrainedLLM.for_model(template)]


FILL_CHUNK_ELEMENTS = 1 << 24  # a shard is filled this many values at a time (64 MiB in fp32)


def materialize_fsdp(model: nn.Module, initial: InitialWeights, device: torch.device) -> None:
    """Allocate this rank's shards of a meta-built, `fully_shard`ed model and fill them."""
    from torch.distributed.tensor import DTensor

    # to_empty replaces buffers too; they were computed at construction, so keep them.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
        params = dict(model.named_parameters())
        for unit in initial.units():
            for name, entry in unit.items():
                param = params[name]
                if isinstance(param, DTensor):
                    # Row chunks: a read shard of a 150k-row matrix would be a second copy of it.
                    local, rows = param.to_local(), _local_rows(param)
                    step = max(1, FILL_CHUNK_ELEMENTS // max(local[:1].numel(), 1))
                    for start in range(rows.start, rows.stop, step):
                        part = slice(start, min(start + step, rows.stop))
                        into = local[part.start - rows.start : part.stop - rows.start]
                        into.copy_(initial.value(entry, name, part))
                else:
                    param.copy_(initial.value(entry, name))


def _local_rows(param) -> slice:
    """The rows of the full tensor this rank's shard holds (FSDP2 shards dim 0 as torch.chunk)."""
    (placement,) = param.placements
    assert placement.is_shard(0), placement
    mesh = param.device_mesh
    size = param.shape[0]
    chunk = -(-size // mesh.size())
    start = min(mesh.get_local_rank() * chunk, size)
    rows = slice(start, min(start + chunk, size))
    assert param.to_local().shape[0] == rows.stop - rows.start, (param.shape, rows)
    return rows


def fill_zero3(model: nn.Module, initial: InitialWeights, rank: int) -> None:
    """Fill a ZeRO-3 partitioned model unit by unit: the unit's parameters are gathered, rank 0
    writes them, and DeepSpeed partitions them again."""
    import deepspeed

    params = dict(model.named_parameters())
    for unit in initial.units():
        unit_params = [params[name] for name in unit]
        with deepspeed.zero.GatheredParameters(unit_params, modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for name, entry in unit.items():
                        params[name].copy_(initial.value(entry, name))
