import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import models.lm_head
from models.batch import IGNORE_INDEX
from models.lm_head import LMHead


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows of a 17-token vocabulary."""
    monkeypatch.setattr(models.lm_head, "LOGITS_CHUNK_ELEMENTS", 3 * 17)


def _head_and_inputs(dtype=torch.float64):
    torch.manual_seed(0)
    # width 2 < 3 rows per chunk, so the weight's transpose (2, 17) is never taken for logits
    head = LMHead(2, 17).to(dtype)
    hidden = torch.randn(23, 2, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 17, (23,))
    labels[[3, 11]] = IGNORE_INDEX
    return head, hidden, labels


def test_chunked_loss_and_gradients_equal_plain_cross_entropy(small_chunks):
    head, hidden, labels = _head_and_inputs()
    loss = head(hidden, labels)
    grads = torch.autograd.grad(2.5 * loss, (hidden, head.weight))
    reference = F.cross_entropy(head(hidden), labels, reduction="sum")
    expected = torch.autograd.grad(2.5 * reference, (hidden, head.weight))
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation computes no gradients and gives the same loss
        torch.testing.assert_close(head(hidden, labels), reference, rtol=1e-12, atol=1e-12)


def test_a_frozen_head_still_gives_the_hidden_states_their_gradient(small_chunks):
    head, hidden, labels = _head_and_inputs()
    head.requires_grad_(False)
    (grad,) = torch.autograd.grad(head(hidden, labels), hidden)
    (expected,) = torch.autograd.grad(
        F.cross_entropy(head(hidden), labels, reduction="sum"), hidden
    )
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


class _MostLogitRows(TorchDispatchMode):
    """The most rows of any (rows, vocabulary) tensor an operation produces."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.most = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
                if tensor.shape[1] == self.vocab_size:
                    self.most = max(self.most, tensor.shape[0])
        return out


def test_no_more_than_one_chunk_of_logits_exists_at_once(small_chunks):
    head, hidden, labels = _head_and_inputs()
    with _MostLogitRows(17) as chunked:
        head(hidden, labels).backward()
    with _MostLogitRows(17) as plain:
        F.cross_entropy(head(hidden), labels, reduction="sum").backward()
    assert plain.most == 23  # the whole micro-batch's logits
    assert chunked.most == 3  # one chunk's
