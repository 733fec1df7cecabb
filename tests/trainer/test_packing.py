"""Skipped samples can leave a rank with few or no documents; it must still run M micro-batches."""

import torch

from models.config import ModelConfig
from models.split_vlm import SplitVLM
from trainer.data.decode import Document
from trainer.data.packing import pack_step


def doc(num_tokens: int, name: str) -> Document:
    return Document(
        sample_id=name,
        input_ids=torch.arange(num_tokens) % 7,
        target_mask=torch.ones(num_tokens, dtype=torch.bool),
        segments=[("text", num_tokens)],
        pixel_values=torch.zeros(0, 3, 32, 32),
        image_mask=torch.zeros(0, dtype=torch.bool),
    )


def test_a_rank_without_documents_runs_the_agreed_number_of_empty_micro_batches():
    agreed = []

    def agree(m: int) -> int:
        agreed.append(m)
        return 3  # another rank needs three

    micro_batches = pack_step([], max_tokens=64, agree_num_micro_batches=agree)
    assert agreed == [1]  # a rank with nothing still asks for one: M is never 0
    assert len(micro_batches) == 3
    assert all(mb.num_text_targets == 0 and mb.num_tokens == 1 for mb in micro_batches)
    # Fewer documents than micro-batches: every document in its own, fillers for the rest.
    micro_batches = pack_step([doc(5, "a")], 64, agree_num_micro_batches=lambda m: 3)
    assert [mb.sample_ids for mb in micro_batches] == [["a"], ["<filler>"], ["<filler>"]]
    micro_batches = pack_step([doc(5, "a"), doc(6, "b")], 64, agree_num_micro_batches=lambda m: 2)
    assert sorted(mb.sample_ids for mb in micro_batches) == [["a"], ["b"]]


def test_a_filler_micro_batch_adds_zero_loss_and_zero_gradient():
    torch.manual_seed(0)
    model = SplitVLM(ModelConfig(vocab_size=11))
    (filler,) = pack_step([], 64)
    out = model(filler)
    loss = out["text_loss_sum"] + out["image_loss_sum"]
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
