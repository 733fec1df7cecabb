"""Run configuration: dataclass defaults → a YAML file → `--set a.b=c` overrides.

Strict on purpose: an unknown key or a value of the wrong type raises `ConfigError` naming the key
and the file it came from, because a silently ignored typo costs a cluster run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from models.config import ModelConfig
from trainer.data.shards import MAX_IMAGE_PIXELS


class ConfigError(ValueError):
    """A user error in a config file or an override; the message is one line."""


# The names the trainer's registries accept. Here rather than next to the registries because
# trainer.engines and trainer.optim import this module (importing them back would be a cycle, and
# pull torch into every config load); each registry asserts that it matches.
ENGINE_NAMES = ("local", "fsdp", "deepspeed")
PRECISIONS = ("auto", "bf16", "fp32")  # engine.mixed_precision
SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule
# optim.stage → the components it trains (SplitVLM.COMPONENTS: the vision tower; the adaptor,
# with the mask embedding, LLaVA-NeXT's newline and Janus's generation path; the language
# model, everything else, the image heads included).
STAGES = {
    "align": ("adaptor",),  # the connector alone: LLaVA's, DeepSeek-VL's and Janus's stage 1
    "instruct": ("adaptor", "llm"),  # the tower frozen: LLaVA's stage 2
    "full": ("vision", "adaptor", "llm"),  # every part: PaliGemma's recipe
}
ZERO_STAGES = (1, 2, 3)  # engine.zero_stage
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's


@dataclass
class RunConfig:
    name: str = "run"
    # Relative paths are resolved against the directory `splitvlm train` is started from.
    dir: str = "runs/run"
    seed: int = 0
    steps: int = 100
    log_every: int = 10
    # RUN/samples.jsonl: the sample ids of every step (all ranks), appended, replays included.
    log_sample_ids: bool = False
    # Host allocations of at least this many KiB are mmapped, so freed tensors leave the
    # process's resident memory (trainer/host_memory.py); 0: the C library's own policy.
    host_mmap_threshold_kib: int = 256

    def validate(self) -> None:
        if self.host_mmap_threshold_kib < 0:
            raise ValueError(
                f"run.host_mmap_threshold_kib={self.host_mmap_threshold_kib} must be >= 0"
            )
        if self.seed < 0:
            raise ValueError(f"run.seed={self.seed} must be >= 0 (numpy seeds are unsigned)")
        if self.steps < 0:
            raise ValueError(f"run.steps={self.steps} must be >= 0")
        if self.log_every < 1:
            raise ValueError(f"run.log_every={self.log_every} must be >= 1")


SHUFFLE_ALGOS = ("py1e", "py1br", "py1b", "py1s", "py2s", "naive")  # mosaicml-streaming's


@dataclass
class StreamConfig:
    """One shard set of a mixture. Give at most one of proportion, repeat, choose; proportions
    are relative (normalized over the streams), repeat and choose are absolute, and streaming
    does not allow mixing the two kinds."""

    path: str = ""  # a directory of MDS splits, like data.path; with `remote`: its local cache
    remote: str = ""  # remote directory of MDS splits (s3://, gs://, oci://, hf://, or a path)
    proportion: float | None = None  # share of each epoch
    repeat: float | None = None  # passes over this stream per epoch (0.5: a random half)
    choose: int | None = None  # samples drawn from this stream per epoch


@dataclass
class DataConfig:
    path: str = "data/demo"  # a directory of MDS splits: PATH/train, PATH/heldout
    split: str = "train"
    # A mixture of shard sets; empty: the single stream at `path` (or `remote`).
    streams: list[StreamConfig] = field(default_factory=list)
    remote: str = ""  # without streams: read the splits from here, cached under `path`
    cache_dir: str = ""  # cache of remote streams that give no `path`; empty: a temp directory
    tokenizer: str = ""  # empty: PATH/tokenizer (written by `splitvlm shards demo`)
    generate_demo: bool = False  # write the demo shards to `path` when it does not exist
    batch_size: int = 16  # samples per rank per optimizer step (when global_batch_size is 0)
    # Samples per optimizer step over all ranks; fixed, it makes a step independent of the
    # world size (each rank takes global_batch_size / world_size). 0: batch_size × world size.
    global_batch_size: int = 0
    max_tokens: int = 2048  # tokens per micro-batch
    # Move whole samples between ranks each step so every rank carries about as many tokens.
    balance_ranks: bool = True
    epoch_size: int = 0  # samples per epoch of the mixture; 0: what the stream weights give
    num_canonical_nodes: int = 1  # fixed, so the sample order does not depend on world size
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_seed: int = 0
    shuffle_block_size: int = 0  # 0: streaming's default, max(4e6 / num_canonical_nodes, 2^18)
    num_workers: int = 0  # DataLoader worker processes that read and decode samples
    # Steps prepared ahead (read, balanced, packed, copied to the device) while the current one
    # computes, by a thread of the training process, when num_workers > 0 (with 0 the thread
    # would decode beside the training thread); 0: each step's data is prepared in turn.
    prefetch_steps: int = 1
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped; 0: no limit
    # Stop the run when more than this fraction of the samples seen were skipped, judged once
    # `bad_fraction_min_samples` samples have been seen (a few bad samples early are noise).
    max_bad_fraction: float = 0.05
    bad_fraction_min_samples: int = 1000

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot work."""
        if self.shuffle_algo not in SHUFFLE_ALGOS:
            raise ValueError(
                f"data.shuffle_algo={self.shuffle_algo!r}; valid: {', '.join(SHUFFLE_ALGOS)}"
            )
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.prefetch_steps < 0:
            raise ValueError("data.prefetch_steps must be >= 0 (0: no prefetching)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError("data.max_bad_fraction must be between 0 and 1")
        relative = [stream.proportion is not None for stream in self.streams]
        for index, stream in enumerate(self.streams):
            name = f"data.streams[{index}]"
            if not stream.path and not stream.remote:
                raise ValueError(f"{name} needs a path or a remote")
            weights = [
                w for w in (stream.proportion, stream.repeat, stream.choose) if w is not None
            ]
            if len(weights) > 1:
                raise ValueError(f"{name}: give at most one of proportion, repeat, choose")
            if any(w < 0 for w in weights):
                raise ValueError(f"{name}: weights must be >= 0")
            if relative[index] != relative[0]:
                raise ValueError(
                    f"{name}: proportion (relative) and repeat/choose (absolute) cannot be mixed; "
                    "give every stream a proportion, or none"
                )


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # Learning rates of the vision tower and of the adaptor (with the mask embedding) relative
    # to `lr`; the language model uses `lr` itself. All follow the same schedule.
    vision_lr_scale: float = 1.0
    adaptor_lr_scale: float = 1.0
    # A classic training stage by name (STAGES): the components it trains, every other one
    # frozen (models/split_vlm.py `COMPONENTS`), in place of model.vision.trainable; "" none.
    stage: str = ""
    # Parameter-name patterns (fnmatch, e.g. "vision.*", "core.0.*") to freeze; "!PATTERN"
    # unfreezes, and the last pattern matching a name wins. Applied after model.vision.trainable
    # and the stage.
    freeze: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.stage and self.stage not in STAGES:
            raise ValueError(f"optim.stage={self.stage!r}; valid: {', '.join(STAGES)}")
        for name in ("lr", "weight_decay", "grad_clip", "vision_lr_scale", "adaptor_lr_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


@dataclass
class EngineConfig:
    name: str = "local"  # ENGINE_NAMES: local | fsdp | deepspeed
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32; not local
    activation_checkpointing: bool = False  # recompute each transformer block in backward
    compile: bool = False  # torch.compile each transformer block (local, fsdp)
    cpu_offload: bool = False  # keep sharded parameters/optimizer state in host memory (GPU)
    # fsdp: the embedding and the LM head split by rows over the ranks and never gathered
    # (trainer/engines/vocab_parallel.py), instead of FSDP units of their own.
    vocab_parallel: bool = True
    zero_stage: int = 3  # deepspeed: ZeRO stage 1, 2 or 3

    def validate(self) -> None:
        # cpu_offload without a GPU is refused by the engine: only the worker knows its device.
        if self.name not in ENGINE_NAMES:
            raise ValueError(f"engine.name={self.name!r}; valid: {', '.join(ENGINE_NAMES)}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"engine.mixed_precision={self.mixed_precision!r}; valid: {', '.join(PRECISIONS)}"
            )
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(
                f"engine.zero_stage={self.zero_stage}; valid: {', '.join(map(str, ZERO_STAGES))}"
            )
        if self.compile and self.name == "deepspeed":
            raise ValueError(
                "engine.compile is not supported with engine.name=deepspeed (ZeRO-3's parameter "
                "hooks run inside the block); use engine.name=fsdp"
            )


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 saves only at the end
    keep_last: int = 2
    # Model weights (a directory written by `splitvlm export`) to start a new run from, e.g. the
    # adaptor-alignment stage before finetuning; ignored once the run has its own checkpoint.
    init_from: str = ""
    on_stop: bool = True  # a run stopped by SIGINT/SIGTERM saves a checkpoint at its last step

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0 (0: only at the end)")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0: keep all)")


@dataclass
class ClusterConfig:
    address: str = ""  # empty: start an embedded Ray cluster here; "auto", HOST:PORT, ray://…
    num_workers: int | list[int] = 1  # an int, or [min, max]: Ray Train elastic scaling
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # when GPUs are used
    use_gpu: bool | str = "auto"  # auto: when the cluster has GPUs
    max_failures: int = 0  # worker-group restarts from the latest checkpoint; -1: unlimited
    # How Ray Train places the workers' bundles: PACK fills a node first, SPREAD puts them on
    # as many nodes as it can (STRICT_*: or fails); one worker per node needs SPREAD.
    placement_strategy: str = "PACK"
    # Elastic runs: how often a healthy worker group checks whether the cluster has room for
    # more workers (a node came back); growing restarts it from the latest checkpoint.
    elastic_resize_interval_s: float = 60.0
    # The embedded cluster only: its CPUs and GPUs (null: what the machine has), and the
    # dashboard with the Jobs API on 127.0.0.1 (off: starts faster).
    num_cpus: int | None = None
    num_gpus: int | None = None
    dashboard: bool = False

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal unless elastic."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        return self.num_workers[0], self.num_workers[1]

    def validate(self) -> None:
        if isinstance(self.num_workers, list) and len(self.num_workers) != 2:
            raise ValueError(f"cluster.num_workers={self.num_workers}: give an int or [min, max]")
        low, high = self.worker_range
        if not 1 <= low <= high:
            raise ValueError(f"cluster.num_workers={self.num_workers}: need 1 <= min <= max")
        if isinstance(self.use_gpu, str) and self.use_gpu != "auto":
            raise ValueError(f"cluster.use_gpu={self.use_gpu!r}; valid: auto, true, false")
        if self.max_failures < -1:
            raise ValueError("cluster.max_failures must be >= -1 (-1: unlimited)")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"cluster.placement_strategy={self.placement_strategy!r}; valid: "
                f"{', '.join(PLACEMENT_STRATEGIES)}"
            )
        if self.elastic_resize_interval_s < 0:
            raise ValueError("cluster.elastic_resize_interval_s must be >= 0")


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline (files under RUN/wandb, no network, no key) | disabled
    project: str = "splitvlm"
    entity: str = ""  # empty: your default W&B entity
    tags: list[str] = field(default_factory=list)
    name: str = ""  # empty: run.name


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: str = "auto"  # auto (a bar on a terminal, else lines) | bar | lines
    peak_flops_per_device: float = 0.0  # bf16 dense FLOP/s for MFU; 0: from the device table
    plot: bool = True  # write RUN/metrics.png at the end of a run

    def validate(self) -> None:
        if self.wandb.mode not in ("online", "offline", "disabled"):
            raise ValueError(
                f"logging.wandb.mode={self.wandb.mode!r}; valid: online, offline, disabled"
            )
        if self.progress not in ("auto", "bar", "lines"):
            raise ValueError(f"logging.progress={self.progress!r}; valid: auto, bar, lines")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Every section's `validate()`: raise ValueError naming the first key that cannot work."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        if 0 < self.model.learned_positions < self.data.max_tokens:
            raise ValueError(
                f"data.max_tokens={self.data.max_tokens} > model.learned_positions="
                f"{self.model.learned_positions}: a document could outgrow the position table"
            )


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key.sub=value` overrides (values are YAML)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} is not valid YAML") from None
        if raw is not None:
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
            _merge(cfg, raw, prefix="", source=str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example run.steps=10")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        nested: dict = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _merge(cfg, nested, prefix="", source="--set")
    return _validated(cfg)


def config_from_dict(raw: dict) -> Config:
    """A config from `config_to_dict` output (how Ray workers get theirs), checked like a file."""
    cfg = Config()
    _merge(cfg, raw, prefix="", source="dict")
    return _validated(cfg)


def _validated(cfg: Config) -> Config:
    try:
        cfg.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _merge(obj, raw: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    valid = {f.name for f in dataclasses.fields(obj)}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(
                f"{source}: unknown key '{name}' (valid here: {', '.join(sorted(valid))})"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{name}' is a section and needs a mapping")
            _merge(current, value, prefix=f"{name}.", source=source)
        else:
            setattr(obj, key, _coerce(value, hints[key], name, source))


def _coerce(value, expected, name: str, source: str):
    """Check `value` against a field's annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option, name, source)
            except ConfigError:
                continue
    elif origin in (list, tuple):
        (item_type, *_) = typing.get_args(expected) or (object,)
        if isinstance(value, list | tuple):
            if dataclasses.is_dataclass(item_type):
                return [_section(v, item_type, f"{name}[{i}]", source) for i, v in enumerate(value)]
            return [_coerce(v, item_type, name, source) for v in value]
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is type(None):
        if value is None:
            return None
    elif expected is object or isinstance(value, expected):
        return value
    shown = getattr(expected, "__name__", str(expected))
    raise ConfigError(f"{source}: '{name}' must be {shown}, got {type(value).__name__} {value!r}")


def _section(value, cls, name: str, source: str):
    """A list item that is a config section, e.g. one of `data.streams`."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{name}' is a section and needs a mapping")
    section = cls()
    _merge(section, value, prefix=f"{name}.", source=source)
    return section
