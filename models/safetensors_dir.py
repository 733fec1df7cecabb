"""A transformers checkpoint directory's safetensors, read tensor by tensor (and row range by
row range): `model.safetensors`, or `model.safetensors.index.json` and the shards it names."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class SafetensorsDir:
    def __init__(self, path: str | Path, what: str):
        """`what`: the config key the directory came from, for error messages."""
        self.path = Path(path)
        self.what = what

    @functools.cached_property
    def listed_in(self) -> Path:
        """The file that names the checkpoint's tensors: the single file or the shard index."""
        single = self.path / "model.safetensors"
        if single.is_file():  # transformers prefers it too when both exist
            return single
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return index
        raise ValueError(
            f"{self.path}: no model.safetensors or model.safetensors.index.json (only safetensors "
            "checkpoints are read; save_pretrained writes them)"
        )

    @functools.cached_property
    def tensor_files(self) -> dict[str, Path]:
        """Every tensor's name → the file holding it."""
        listed_in = self.listed_in
        if listed_in.name == "model.safetensors":
            with self.open(listed_in) as handle:
                return dict.fromkeys(handle.keys(), listed_in)
        try:
            weight_map = json.loads(listed_in.read_text())["weight_map"]
            files = {tensor: self.path / file for tensor, file in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(
                f"{listed_in}: not a safetensors index (needs a JSON 'weight_map' of tensor → file)"
            ) from None
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{listed_in}: names the shard {file.name}, which is missing")
        return files

    @contextlib.contextmanager
    def open(self, file: Path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                yield handle
        except SafetensorError as err:
            raise ValueError(f"{file}: {one_line(err)}") from None

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole tensor `name` in fp32; a ValueError naming the file unless it has `shape`."""
        if name not in self.tensor_files:
            raise ValueError(f"{self.listed_in}: no tensor {name!r}")
        file = self.tensor_files[name]
        with self.open(file) as handle:
            if name not in set(handle.keys()):
                raise ValueError(f"{file}: no tensor {name!r} ({self.listed_in.name} puts it here)")
            theirs = tuple(handle.get_slice(name).get_shape())
            if theirs != shape:
                raise ValueError(
                    f"{file}: tensor {name!r} has shape {list(theirs)}, {self.what} needs "
                    f"{list(shape)} (from {self.path / 'config.json'})"
                )
            return handle.get_tensor(name).float()


def one_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
