"""Step batches from MDS shards through mosaicml-streaming.

The data cursor is (epoch, global samples consumed in the epoch). With `num_canonical_nodes`
fixed, streaming gives the same global sample order for any world size, so a resumed run — on
the same or another number of workers — continues at exactly the next sample.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from streaming import StreamingDataset
from torch.utils.data import DataLoader

from trainer.config import DataConfig
from trainer.data.decode import DecodeError, Decoder, Document
from trainer.data.shards import check_split_dir
from trainer.distributed import WorldInfo, broadcast_object


@dataclass
class Skipped:
    sample_index: int
    reason: str


class DecodedDataset(StreamingDataset):
    """A StreamingDataset whose items are decoded `Document`s (or `Skipped` markers)."""

    def __init__(self, decoder: Decoder, **kwargs):
        super().__init__(**kwargs)
        self.decoder = decoder

    def get_item(self, sample_id: int, retry: int = 7):
        raw = super().get_item(sample_id, retry)
        try:
            # next_epoch was advanced when this epoch's iteration started.
            return self.decoder(raw, sample_id, epoch=self.next_epoch - 1)
        except DecodeError as err:
            return Skipped(sample_id, err.reason)


@dataclass
class DataCursor:
    epoch: int = 0
    sample_in_epoch: int = 0  # global: summed over ranks
    skipped: Counter = field(default_factory=Counter)  # this rank's skips, by reason

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch}


def _keep_list(batch):
    return batch


def rank_batch_size(cfg: DataConfig, world_size: int) -> int:
    """Samples per rank per step: data.global_batch_size split evenly, else data.batch_size."""
    if cfg.global_batch_size <= 0:
        return cfg.batch_size
    if cfg.global_batch_size % world_size:
        raise ValueError(
            f"data.global_batch_size={cfg.global_batch_size} does not divide over "
            f"{world_size} workers"
        )
    return cfg.global_batch_size // world_size


class StepBatches:
    """Yields this rank's `batch_size` samples per step, forever, across epochs."""

    def __init__(self, cfg: DataConfig, decoder: Decoder, world: WorldInfo, split: str = ""):
        local = Path(cfg.path) / (split or cfg.split)
        check_split_dir(local)
        world.export_env()
        self.cfg = cfg
        self.world = world
        self.batch_size = rank_batch_size(cfg, world.world_size)
        self.dataset = DecodedDataset(
            decoder,
            local=str(local),
            batch_size=self.batch_size,
            shuffle=cfg.shuffle,
            shuffle_seed=cfg.shuffle_seed,
            num_canonical_nodes=cfg.num_canonical_nodes,
            # streaming's own defaults, stated so it does not warn about choosing them
            predownload=8 * self.batch_size,
            shuffle_block_size=max(4_000_000 // cfg.num_canonical_nodes, 1 << 18),
        )
        self.loader = DataLoader(
            self.dataset, batch_size=self.batch_size, collate_fn=_keep_list, drop_last=True
        )
        self.cursor = DataCursor()
        self._iterator = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world.world_size

    def seek(self, epoch: int, sample_in_epoch: int) -> None:
        """Continue at global sample `sample_in_epoch` of `epoch` (before the next `next()`)."""
        self.cursor.epoch, self.cursor.sample_in_epoch = epoch, sample_in_epoch
        # Rank 0 only, as streaming documents: state_dict() reads the node's shared resume block,
        # which load_state_dict() on the node's other ranks writes.
        state = None
        if self.world.rank == 0:
            state = self.dataset.state_dict(num_samples=sample_in_epoch, from_beginning=True)
            state["epoch"] = epoch
        state = broadcast_object(state)
        self.dataset.load_state_dict(state)
        self._iterator = None

    def next_step(self) -> tuple[list[Document], list[Skipped]]:
        for _attempt in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
                break
            except StopIteration:
                self._iterator = None
                self.cursor.epoch += 1
                self.cursor.sample_in_epoch = 0
        else:
            raise ValueError(
                f"{self.cfg.path}: fewer samples than one global batch ({self.global_batch_size})"
            )
        self.cursor.sample_in_epoch += self.global_batch_size
        docs = [item for item in batch if isinstance(item, Document)]
        skipped = [item for item in batch if isinstance(item, Skipped)]
        self.cursor.skipped.update(s.reason for s in skipped)
        return docs, skipped
