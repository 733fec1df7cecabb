"""`splitvlm export`: a checkpoint of any engine → one safetensors model plus its config.

Runs in a single process without torch.distributed: DCP checkpoints are read with DCP's
no-process-group path, DeepSpeed ZeRO partitions are merged by DeepSpeed's own zero_to_fp32.
The result loads with `models.split_vlm.SplitVLM.from_pretrained(DIR)`.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.hf_designs import write_export
from models.split_vlm import SplitVLM
from trainer.checkpoint import resolve_checkpoint
from trainer.config import load_config, save_config
from trainer.data.decode import load_tokenizer, tokenizer_dir


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write OUT/model.safetensors, config.yaml (model), vision_config.json, train_config.yaml
    and tokenizer/; returns the checkpoint directory that was exported."""
    step_dir = resolve_checkpoint(checkpoint)
    cfg = load_config(step_dir / "config.yaml")
    cfg.model.vision.pretrained = ""  # the checkpoint holds the encoder's weights
    model = SplitVLM(cfg.model)  # a template: every weight is overwritten below
    engine_dir = step_dir / "engine"
    readers = {"local": _read_local, "fsdp": _read_dcp, "deepspeed": _read_deepspeed}
    if cfg.engine.name not in readers:
        raise ValueError(f"{step_dir}: unknown engine {cfg.engine.name!r}")
    state = readers[cfg.engine.name](engine_dir, model)
    model.load_state_dict(state)  # strict: every weight present, nothing left over
    out = Path(out)
    write_export(model, out, source=str(step_dir))
    save_config(cfg, out / "train_config.yaml")
    tokenizer = tokenizer_dir(cfg.data)
    if tokenizer.is_dir():  # with the tokens the run added (image markers): the model's vocab
        load_tokenizer(tokenizer, cfg.model).save_pretrained(out / "tokenizer")
    return step_dir


def export_to_hf(source: Path, out: Path) -> str:
    """`splitvlm export --to-hf`: a splitvlm export, run or checkpoint → the transformers
    checkpoint of its design (models/hf_designs.py); returns the transformers class."""
    from models.hf_designs import export_hf

    source = Path(source)
    if (source / "vision_config.json").is_file():  # an export (or an import-hf) already
        return export_hf(source, out)
    with tempfile.TemporaryDirectory(prefix="splitvlm-export-") as scratch:
        export_checkpoint(source, Path(scratch))
        return export_hf(Path(scratch), out)


def _read_local(engine_dir: Path, model) -> dict:
    return load_file(str(engine_dir / "model.safetensors"))


def _read_dcp(engine_dir: Path, model) -> dict:
    import torch.distributed.checkpoint as dcp

    from trainer.engines.fsdp import SafeFileSystemReader, TensorsOnlyLoadPlanner

    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(engine_dir)),
            planner=TensorsOnlyLoadPlanner(),
            no_dist=True,
        )
    return state["model"]


def _read_deepspeed(engine_dir: Path, model) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(engine_dir.parent), tag=engine_dir.name
        )
    return {k: v.clone() for k, v in state.items()}  # zero_to_fp32 may hand out views


@contextlib.contextmanager
def _weights_only_torch_load():
    # zero_to_fp32 calls torch.load(weights_only=False); this process only exports, so for its
    # duration torch.load is forced to weights_only=True with DeepSpeed's few record classes.
    from trainer.engines.deepspeed import deepspeed_checkpoint_globals

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
