"""Checkpoint directories: `RUN/checkpoints/step_NNNNNNN/`, written atomically.

A checkpoint is built under a temporary name and renamed when every rank has written its part;
the `latest` pointer is replaced last. A crash mid-save therefore never hides the last good
checkpoint, and a directory without `trainer_state.json` is never taken for a complete one.
`manifest.json` lists every file with its size, so a checkpoint truncated or partly copied later
is recognized before any rank starts loading it (a rank failing alone inside a collective load
would leave the others waiting). A checkpoint that still fails to load is skipped on all ranks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.config import Config, save_config
from trainer.distributed import WorldInfo, all_reduce_max, barrier, broadcast_object
from trainer.engines.base import Engine, IncompatibleCheckpointError

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


class CheckpointLoadError(RuntimeError):
    """Raised on every rank when loading a checkpoint failed on any rank."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    engine: Engine,
    trainer_state: dict,
    cfg: Config,
    world: WorldInfo,
    keep_last: int = 0,
) -> Path:
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp / "engine")
    torch.save(_rng_state(), tmp / f"rng_rank{world.rank}.pt")
    barrier()
    if world.is_main:
        save_config(cfg, tmp / "config.yaml")
        manifest = {
            str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=0))
        # Written last inside the directory: its presence marks the checkpoint complete.
        state = {"step": step, "world_size": world.world_size, **trainer_state}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        if keep_last > 0:
            _prune(root, keep_last)
    barrier()
    return final


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; broken ones are skipped with a warning naming them."""
    return next(iter(complete_checkpoints(run_dir)), None)


def resolve_checkpoint(path: Path) -> Path:
    """A complete step directory as it is, or a run directory's latest complete checkpoint: the
    one resume would take. Anything else is a ValueError (one line)."""
    path = Path(path)
    if path.name.startswith("step_") and _check_complete(path) is None:
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise ValueError(
            f"{path} is neither a checkpoint (a complete step_NNNNNNN/) nor a run directory with one"
        )
    return latest


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, the `latest` one first, then newest first; broken ones are left out
    with a warning naming them."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    latest = root / "latest"
    if latest.is_file():
        pointed = root / latest.read_text().strip()
        if pointed in candidates:
            candidates.remove(pointed)
            candidates.insert(0, pointed)
    complete = []
    for path in candidates:
        problem = _check_complete(path)
        if problem is None:
            complete.append(path)
        else:
            warn_skipped(path, problem)
    return complete


def warn_skipped(path: Path, problem: str) -> None:
    print(f"warning: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)


def load_checkpoint(path: Path, engine: Engine, world: WorldInfo) -> dict:
    """Restore engine state and RNG; returns the trainer state saved with the checkpoint.

    Raises CheckpointLoadError on every rank if the engine state failed to load on any rank.
    """
    path = Path(broadcast_object(str(path)))
    error = None
    try:
        engine.load(path / "engine")
    except IncompatibleCheckpointError:
        raise  # every rank sees the same mismatch, and older checkpoints have it too
    except Exception as err:  # whatever broke, this checkpoint does not load
        error = err
    if all_reduce_max(int(error is not None)):
        raise CheckpointLoadError(f"{type(error).__name__}: {error}" if error else "another rank")
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def _check_complete(path: Path) -> str | None:
    state = path / STATE_FILE
    if not state.is_file():
        return f"{STATE_FILE} is missing (interrupted save?)"
    try:
        json.loads(state.read_text())["step"]
    except (json.JSONDecodeError, KeyError):
        return f"{STATE_FILE} is corrupt"
    if not (path / "engine").is_dir():
        return "engine state is missing"
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return f"{MANIFEST_FILE} is corrupt"
        for name, size in sizes.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def _write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    tmp.write_text(name)
    os.replace(tmp, root / "latest")


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": numpy_state[2],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate(state["python"])
