import importlib.util
import random
import warnings
from itertools import accumulate
from types import SimpleNamespace

import pytest
import torch

from models.attention import (
    ATTENTION_BACKENDS,
    FLEX_BLOCK_SIZE,
    PackedLayout,
    dense_reference_attention,
    flash_attn_varlen_func_emulated,
    flex_block_tables,
    packed_attention,
    varlen_attn_emulated,
)
from models.config import ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CONTRACT_DOCS = [[("text", 5), ("image", 16), ("text", 7)], [("text", 9)]]
NUM_SEEDS = 12
# Sliding windows from one position up, most shorter than the random documents and image spans.
WINDOWS = [1, 2, 3, 5, 8, 13]


def _flex_cpu_forward_unavailable() -> str | None:
    """Why flex cannot run forward on this machine's CPU, or None if it can."""
    try:
        layout = PackedLayout.from_docs([[("text", 3), ("image", 2)]])
        q = torch.randn(5, 2, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": eager on purpose
            packed_attention(q, q, q, layout, backend="flex")
    except Exception as error:  # any failure means: no CPU flex in this torch build
        return f"flex_attention forward fails on CPU with this torch: {error!r}"
    return None


FLEX_CPU_SKIP_REASON = _flex_cpu_forward_unavailable()
needs_flex_cpu = pytest.mark.skipif(
    FLEX_CPU_SKIP_REASON is not None, reason=str(FLEX_CPU_SKIP_REASON)
)
# flex has no CPU backward in torch, so on CPU it is checked on forward outputs only
CPU_BACKENDS = [
    "sdpa",
    "flash_emulated",
    "varlen_emulated",
    pytest.param("flex", marks=needs_flex_cpu),
]
CPU_TRAINING_BACKENDS = ["sdpa", "flash_emulated", "varlen_emulated"]


def random_docs(rng: random.Random) -> list[list[tuple[str, int]]]:
    """1-8 documents: text-only, image-only or mixed, 0-6 images, spans as short as 1 token."""
    docs = []
    for _ in range(rng.randint(1, 8)):
        style = rng.choice(["mixed", "mixed", "text_only", "image_only"])
        if style == "text_only":
            doc = [("text", rng.randint(1, 24)) for _ in range(rng.randint(1, 2))]
        elif style == "image_only":
            doc = [
                ("image", rng.choice([1, 2, rng.randint(3, 16)])) for _ in range(rng.randint(1, 3))
            ]
        else:
            doc = [("text", rng.randint(1, 8))] if rng.random() < 0.7 else []
            for _ in range(rng.randint(0, 6)):
                doc.append(("image", rng.choice([1, rng.randint(2, 12)])))
                if rng.random() < 0.6:  # otherwise consecutive image spans
                    doc.append(("text", rng.randint(1, 6)))
            if not doc:
                doc = [("text", 1)]
        docs.append(doc)
    return docs


def random_long_docs(rng: random.Random, min_tokens: int) -> list[list[tuple[str, int]]]:
    """Random documents until there are more than min_tokens tokens (several flex blocks)."""
    docs = []
    while sum(length for doc in docs for _, length in doc) <= min_tokens:
        docs += random_docs(rng)
    return docs


def random_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, seed: int, head_dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    return q, k, v


def visibility(layout: PackedLayout, window: int | None = None) -> torch.Tensor:
    """(T, T) bool from the contract itself: query t sees its document up to vis_end[t] and,
    under a window, no key k <= t - window."""
    key_T = torch.arange(layout.num_tokens)
    visible_TT = (key_T[None, :] >= layout.doc_start[:, None]) & (
        key_T[None, :] <= layout.vis_end[:, None]
    )
    if window is not None:
        visible_TT &= key_T[None, :] > key_T[:, None] - window
    return visible_TT


# ---------------------------------------------------------------------------------------------
# PackedLayout


def test_from_docs_contract_example():
    layout = PackedLayout.from_docs(CONTRACT_DOCS)
    assert layout.num_tokens == 37 and layout.num_docs == 2 and layout.max_seqlen == 28
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == [0, 28, 37]
    assert layout.position_ids.dtype == torch.int64
    assert layout.position_ids.tolist() == list(range(28)) + list(range(9))
    assert layout.doc_start.dtype == torch.int32 and layout.vis_end.dtype == torch.int32
    assert layout.doc_start.tolist() == [0] * 28 + [28] * 9
    assert layout.vis_end.tolist() == [0, 1, 2, 3, 4] + [20] * 16 + list(range(21, 37))
    assert layout.is_image.dtype == torch.bool
    assert layout.is_image.tolist() == [False] * 5 + [True] * 16 + [False] * 16


def test_from_docs_flash_plan_on_contract_example():
    layout = PackedLayout.from_docs(CONTRACT_DOCS)
    calls = {(call.kind, call.ordinal): call for call in layout.flash_calls}
    assert set(calls) == {("text", 0), ("image", 0), ("text", 1)}
    expected = {  # (causal, query rows, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        ("text", 0): (True, [*range(0, 5), *range(28, 37)], [0, 5, 5, 14], [0, 5, 28, 37], 9, 23),
        ("image", 0): (False, list(range(5, 21)), [0, 16, 16], [0, 21, 37], 16, 21),
        ("text", 1): (True, list(range(21, 28)), [0, 7, 7], [0, 28, 37], 7, 28),
    }
    for key, (causal, rows, cu_q, cu_k, max_q, max_k) in expected.items():
        call = calls[key]
        assert call.causal == causal
        assert call.query_index.tolist() == rows
        assert call.cu_seqlens_q.dtype == torch.int32 and call.cu_seqlens_k.dtype == torch.int32
        assert call.cu_seqlens_q.tolist() == cu_q and call.cu_seqlens_k.tolist() == cu_k
        assert (call.max_seqlen_q, call.max_seqlen_k) == (max_q, max_k)


def test_adjacent_text_merges_and_adjacent_images_do_not():
    merged = PackedLayout.from_docs([[("text", 3), ("text", 4)]])
    assert merged.segments == (("text", 0, 7),)
    assert merged.vis_end.tolist() == list(range(7))
    dual = PackedLayout.from_docs([[("image", 2), ("image", 3)]])
    assert dual.segments == (("image", 0, 2), ("image", 2, 5))
    assert dual.vis_end.tolist() == [1, 1, 4, 4, 4]


@pytest.mark.parametrize("seed", range(NUM_SEEDS))
def test_flash_plan_covers_every_key_and_query_once(seed):
    layout = PackedLayout.from_docs(random_docs(random.Random(seed)))
    num_tokens = layout.num_tokens
    for call in layout.flash_calls:
        lengths_q = call.cu_seqlens_q.diff()
        lengths_k = call.cu_seqlens_k.diff()
        assert call.cu_seqlens_k[0] == 0 and call.cu_seqlens_k[-1] == num_tokens
        assert (lengths_k > 0).all() and (lengths_q >= 0).all()
        assert lengths_q.max() == call.max_seqlen_q and lengths_k.max() == call.max_seqlen_k
    query_rows = torch.cat([call.query_index for call in layout.flash_calls])
    assert sorted(query_rows.tolist()) == list(range(num_tokens))


def _mask_mod_of(visible_TT: torch.Tensor):
    def mask_mod(batch, head, q_idx, kv_idx):
        return visible_TT[q_idx, kv_idx]

    return mask_mod


@pytest.mark.parametrize("seed", range(4))
def test_flex_block_tables_match_create_block_mask(seed):
    # Eager flex on CPU applies mask_mod to every pair and ignores the block tables, so the
    # forward tests cannot catch a wrong table; torch's own builder is the reference instead.
    from torch.nn.attention.flex_attention import create_block_mask

    layout = PackedLayout.from_docs(random_long_docs(random.Random(seed), 2 * FLEX_BLOCK_SIZE))
    for window in (None, 5, 150, 300):
        blocks = flex_block_tables(layout, window)
        visible_TT = visibility(layout, window)
        expected = create_block_mask(
            _mask_mod_of(visible_TT), None, None, layout.num_tokens, layout.num_tokens, "cpu"
        )
        visited = blocks.kv_num_blocks + blocks.full_kv_num_blocks
        assert torch.equal(visited, expected.kv_num_blocks + expected.full_kv_num_blocks), window
        # our full blocks must be truly full; torch may call a block partial that is in fact full
        for query_block in range(blocks.full_kv_num_blocks.shape[-1]):
            num_full = blocks.full_kv_num_blocks[0, 0, query_block]
            for key_block in blocks.full_kv_indices[0, 0, query_block, :num_full].tolist():
                rows = slice(query_block * FLEX_BLOCK_SIZE, (query_block + 1) * FLEX_BLOCK_SIZE)
                cols = slice(key_block * FLEX_BLOCK_SIZE, (key_block + 1) * FLEX_BLOCK_SIZE)
                assert visible_TT[rows, cols].all(), window


def test_to_device_moves_every_tensor():
    layout = PackedLayout.from_docs(CONTRACT_DOCS + [[("image", 4)]])
    moved = layout.to("meta")
    tensors = []

    def collect(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, tuple):
            for item in value:
                collect(item)
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                collect(getattr(value, name))

    collect(moved)
    assert len(tensors) > 10 and all(t.device.type == "meta" for t in tensors)
    assert layout.doc_start.device.type == "cpu"  # a copy, the original stays
    assert moved.num_tokens == layout.num_tokens and moved.max_seqlen == layout.max_seqlen


@pytest.mark.parametrize(
    "docs, message",
    [
        ([[("video", 3)]], "unknown segment kind"),
        ([[("text", 3), ("image", 0)]], "length >= 1"),
        ([[("text", 3)], []], "document 1 is empty"),
        ([], "at least one document"),
    ],
)
def test_from_docs_rejects_bad_input(docs, message):
    with pytest.raises(ValueError, match=message):
        PackedLayout.from_docs(docs)


def test_unknown_backend_lists_valid_ones():
    layout = PackedLayout.from_docs(CONTRACT_DOCS)
    q, k, v = random_qkv(layout.num_tokens, 2, 2, seed=0)
    with pytest.raises(ValueError, match=", ".join(ATTENTION_BACKENDS)):
        packed_attention(q, k, v, layout, backend="xformers")


def test_heads_must_group():
    layout = PackedLayout.from_docs(CONTRACT_DOCS)
    q, k, v = random_qkv(layout.num_tokens, 3, 2, seed=0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        packed_attention(q, k, v, layout)


# ---------------------------------------------------------------------------------------------
# Backends against the dense reference


def _outputs_and_grads(backend, q, k, v, layout, grad_out, window=None):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if backend == "reference":
        out = dense_reference_attention(*leaves, layout, window=window)
    else:
        out = packed_attention(*leaves, layout, backend=backend, window=window)
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_matches_reference(backend: str, q, k, v, layout, window=None) -> None:
    """`backend`'s output and q/k/v gradients equal the dense reference's (fp32 tolerance)."""
    grad_out = torch.randn_like(q)
    expected_out, expected_grads = _outputs_and_grads(
        "reference", q, k, v, layout, grad_out, window
    )
    out, grads = _outputs_and_grads(backend, q, k, v, layout, grad_out, window)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("num_heads, num_kv_heads", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("backend", CPU_TRAINING_BACKENDS)
@pytest.mark.parametrize("seed", range(NUM_SEEDS))
def test_backend_matches_reference_outputs_and_grads(backend, seed, num_heads, num_kv_heads):
    layout = PackedLayout.from_docs(random_docs(random.Random(seed)))
    q, k, v = random_qkv(layout.num_tokens, num_heads, num_kv_heads, seed)
    assert_matches_reference(backend, q, k, v, layout)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(2, 2), (4, 2)])
@pytest.mark.parametrize("backend", CPU_TRAINING_BACKENDS)
@pytest.mark.parametrize("seed", range(NUM_SEEDS))
def test_windowed_backend_matches_reference_outputs_and_grads(
    backend, seed, num_heads, num_kv_heads
):
    rng = random.Random(seed)
    layout = PackedLayout.from_docs(random_docs(rng))
    q, k, v = random_qkv(layout.num_tokens, num_heads, num_kv_heads, seed)
    assert_matches_reference(backend, q, k, v, layout, window=rng.choice(WINDOWS))


@needs_flex_cpu
@pytest.mark.parametrize("window", [None, 7, 200])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(2, 2), (4, 2)])
@pytest.mark.parametrize("seed", range(4))
def test_flex_forward_matches_reference(seed, num_heads, num_kv_heads, window):
    layout = PackedLayout.from_docs(random_long_docs(random.Random(seed), 2 * FLEX_BLOCK_SIZE))
    q, k, v = random_qkv(layout.num_tokens, num_heads, num_kv_heads, seed)
    out = packed_attention(q, k, v, layout, backend="flex", window=window)
    torch.testing.assert_close(
        out, dense_reference_attention(q, k, v, layout, window=window), rtol=1e-5, atol=1e-5
    )


def test_scale_and_window_are_passed_to_every_backend():
    layout = PackedLayout.from_docs(CONTRACT_DOCS)
    q, k, v = random_qkv(layout.num_tokens, 2, 1, seed=1)
    for window in (None, 4):
        expected = dense_reference_attention(q, k, v, layout, scale=0.05, window=window)
        backends = CPU_TRAINING_BACKENDS + ["auto"] + ([] if FLEX_CPU_SKIP_REASON else ["flex"])
        for backend in backends:
            out = packed_attention(q, k, v, layout, backend=backend, scale=0.05, window=window)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=backend)
    with pytest.raises(ValueError, match="at least 1 position"):
        packed_attention(q, k, v, layout, window=0)


@pytest.mark.parametrize("backend", CPU_TRAINING_BACKENDS)
def test_a_window_no_shorter_than_any_document_changes_nothing(backend):
    layout = PackedLayout.from_docs(CONTRACT_DOCS + [[("text", 3), ("image", 2)]])
    q, k, v = random_qkv(layout.num_tokens, 4, 2, seed=2)
    full = packed_attention(q, k, v, layout, backend=backend)
    for window in (layout.max_seqlen, layout.max_seqlen + 100):
        windowed = packed_attention(q, k, v, layout, backend=backend, window=window)
        torch.testing.assert_close(windowed, full, rtol=0, atol=1e-6)
    assert not torch.allclose(
        packed_attention(q, k, v, layout, backend=backend, window=layout.max_seqlen - 1), full
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_auto_is_the_default_plans_both_candidates_and_is_sdpa_on_cpu(seed, dtype):
    assert ModelConfig().attention_backend == "auto"
    # packing plans on CPU before the copy to a device, so "auto" plans sdpa and flash
    layout = PackedLayout.from_docs(random_docs(random.Random(seed)), backend="auto")
    assert layout.sdpa_blocks is not None and layout.flash_calls is not None
    assert layout.flex_blocks is None
    q, k, v = (t.to(dtype) for t in random_qkv(layout.num_tokens, 4, 2, seed))
    grad_out = torch.randn_like(q)
    expected_out, expected_grads = _outputs_and_grads("sdpa", q, k, v, layout, grad_out)
    out, grads = _outputs_and_grads("auto", q, k, v, layout, grad_out)
    assert torch.equal(out, expected_out)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert torch.equal(grad, expected)


@pytest.mark.parametrize("backend", ["flash_emulated", "varlen_emulated"])
def test_single_query_calls_with_gqa_stay_off_the_kernels_one_query_per_batch_path(backend):
    # Every call of this plan has segments of one query and zero-query batches between them:
    # the shape on which flash-attn would reshape q as one row per batch (the emulators check).
    docs = [[("image", 1), ("text", 1), ("image", 1)], [("text", 1)], [("image", 1), ("text", 1)]]
    layout = PackedLayout.from_docs(docs)
    assert all(call.max_seqlen_q == 1 for call in layout.flash_calls)
    assert all((call.cu_seqlens_q.diff() == 0).any() for call in layout.flash_calls)
    q, k, v = random_qkv(layout.num_tokens, 4, 2, seed=0)
    assert_matches_reference(backend, q, k, v, layout)


# ---------------------------------------------------------------------------------------------
# Mask properties, checked by perturbation (no knowledge of how a backend builds its mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_changing_one_document_never_changes_another(backend, seed):
    docs = random_docs(random.Random(seed)) + [[("text", 4), ("image", 3), ("text", 2)]]
    layout = PackedLayout.from_docs(docs)
    q, k, v = random_qkv(layout.num_tokens, 2, 1, seed)
    out = packed_attention(q, k, v, layout, backend=backend)
    bounds = layout.cu_seqlens.tolist()
    for doc in range(layout.num_docs):
        rows = slice(bounds[doc], bounds[doc + 1])
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for tensor in (q2, k2, v2):
            tensor[rows] += 1.0 + torch.randn_like(tensor[rows])
        out2 = packed_attention(q2, k2, v2, layout, backend=backend)
        others = torch.ones(layout.num_tokens, dtype=torch.bool)
        others[rows] = False
        torch.testing.assert_close(out2[others], out[others], rtol=0, atol=1e-6)
        assert (out2[rows] - out[rows]).abs().amax() > 1e-3


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_key_reaches_exactly_the_queries_that_may_see_it(backend, window):
    """Perturb one key/value row at a time; the outputs that change must be exactly the queries
    whose interval holds that key: text never sees later tokens, an image token sees every token
    of its span, documents stay apart, and a window hides keys window or more positions back."""
    docs = [
        [("text", 3), ("image", 4), ("text", 2), ("image", 1), ("image", 3), ("text", 2)],
        [("image", 2), ("text", 3)],
        [("text", 1)],
    ]
    layout = PackedLayout.from_docs(docs)
    q, k, v = random_qkv(layout.num_tokens, 2, 1, seed=3)
    out = packed_attention(q, k, v, layout, backend=backend, window=window)
    visible_TT = visibility(layout, window)
    for key in range(layout.num_tokens):
        k2, v2 = k.clone(), v.clone()
        k2[key] += 1.0
        v2[key] += 1.0
        out2 = packed_attention(q, k2, v2, layout, backend=backend, window=window)
        changed_T = (out2 - out).abs().amax((1, 2))
        assert torch.equal(changed_T > 1e-6, visible_TT[:, key]), f"key {key}"
        assert (changed_T[~visible_TT[:, key]] == 0).all()


@pytest.mark.parametrize("backend", CPU_TRAINING_BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_text_outputs_ignore_later_tokens(backend, seed):
    layout = PackedLayout.from_docs(random_docs(random.Random(seed)))
    q, k, v = random_qkv(layout.num_tokens, 2, 2, seed)
    out = packed_attention(q, k, v, layout, backend=backend)
    for cut in range(1, layout.num_tokens, max(1, layout.num_tokens // 12)):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for tensor in (q2, k2, v2):
            tensor[cut:] = torch.randn_like(tensor[cut:])
        out2 = packed_attention(q2, k2, v2, layout, backend=backend)
        unaffected = layout.vis_end < cut  # includes every text token before the cut
        assert unaffected[:cut][~layout.is_image[:cut]].all()
        torch.testing.assert_close(out2[unaffected], out[unaffected], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The flash_attn_varlen_func emulator


def _emulate(q, k, v, cu_q, cu_k, causal, **kwargs):
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = torch.tensor(cu_k, dtype=torch.int32)
    max_q, max_k = int(cu_q.diff().max()), int(cu_k.diff().max())
    return flash_attn_varlen_func_emulated(
        q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, **kwargs
    )


def _masked_attention(q, k, v, visible_QK):
    scores_HQK = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    probs = scores_HQK.masked_fill(~visible_QK, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v)


def test_emulator_requires_int32_cu_seqlens():
    q, k, v = random_qkv(4, 2, 2, seed=0)
    cu = torch.tensor([0, 4])
    with pytest.raises(AssertionError, match="int32"):
        flash_attn_varlen_func_emulated(q, k, v, cu, cu.int(), 4, 4)
    with pytest.raises(AssertionError, match="int32"):
        flash_attn_varlen_func_emulated(q, k, v, cu.int(), cu, 4, 4)


def test_emulator_checks_max_seqlen():
    q, k, v = random_qkv(4, 2, 2, seed=0)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(AssertionError, match="max_seqlen_k"):
        flash_attn_varlen_func_emulated(q, k, v, cu, cu, 4, 3)
    with pytest.raises(AssertionError, match="max_seqlen_q"):
        flash_attn_varlen_func_emulated(q, k, v, cu, cu, 3, 4)


def test_emulator_causal_aligns_bottom_right():
    # flash-attn's docstring example: seqlen_q = 2, seqlen_k = 5
    q, _, _ = random_qkv(2, 2, 2, seed=0)
    _, k, v = random_qkv(5, 2, 2, seed=1)
    visible = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(
        _emulate(q, k, v, [0, 2], [0, 5], causal=True), _masked_attention(q, k, v, visible)
    )
    # seqlen_q = 5, seqlen_k = 2: the first three rows see nothing -> output 0, LSE +inf
    q, _, _ = random_qkv(5, 2, 2, seed=2)
    _, k, v = random_qkv(2, 2, 2, seed=3)
    q.requires_grad_()
    out, lse, _ = _emulate(q, k, v, [0, 5], [0, 2], causal=True, return_attn_probs=True)
    visible = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]], dtype=torch.bool)
    torch.testing.assert_close(out, _masked_attention(q, k, v, visible))
    assert (out[:3] == 0).all() and torch.isinf(lse[:, :3]).all() and lse.dtype == torch.float32
    assert lse.shape == (2, 5) and torch.isfinite(lse[:, 3:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:3] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_emulator_window_aligns_bottom_right(causal):
    # seqlen_q = 3, seqlen_k = 7: query i sits at key i + 4 and sees keys from i + 4 - 2 on,
    # up to itself (causal, window (2, 0)) or to the last key (window (2, -1)).
    q, _, _ = random_qkv(3, 2, 2, seed=0)
    _, k, v = random_qkv(7, 2, 2, seed=1)
    visible = torch.zeros(3, 7, dtype=torch.bool)
    for i in range(3):
        visible[i, i + 2 : i + 5 if causal else 7] = True
    window = (2, 0) if causal else (2, -1)
    out = _emulate(q, k, v, [0, 3], [0, 7], causal=causal, window_size=window)
    torch.testing.assert_close(out, _masked_attention(q, k, v, visible))
    if causal:  # causal=True and a window (2, -1) are the same: causal sets the right side to 0
        torch.testing.assert_close(
            _emulate(q, k, v, [0, 3], [0, 7], causal=True, window_size=(2, -1)), out
        )


def test_emulator_zero_query_batch_reads_no_keys():
    q, _, _ = random_qkv(3, 4, 2, seed=0)
    _, k, v = random_qkv(7, 4, 2, seed=1)
    k.requires_grad_()
    # batch 0: zero queries over keys 0..3; batch 1: three queries over keys 4..6 (GQA 4:2)
    out = _emulate(q, k, v, [0, 0, 3], [0, 4, 7], causal=False)
    expected = _masked_attention(
        q,
        k[4:].repeat_interleave(2, 1),
        v[4:].repeat_interleave(2, 1),
        torch.ones(3, 3, dtype=torch.bool),
    )
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert (k.grad[:4] == 0).all() and (k.grad[4:] != 0).any()


def test_emulator_refuses_zero_query_batches_on_the_single_query_gqa_path():
    # flash-attn: max_seqlen_q == 1, GQA and no window reshape q to (batches, Hkv, H / Hkv, D)
    q, _, _ = random_qkv(1, 4, 2, seed=0)
    _, k, v = random_qkv(5, 4, 2, seed=1)
    cu_q = torch.tensor([0, 0, 1], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 5], dtype=torch.int32)
    for causal in (False, True):  # causal is dropped before the window is set when max_q == 1
        with pytest.raises(AssertionError, match="one query per batch"):
            flash_attn_varlen_func_emulated(q, k, v, cu_q, cu_k, 1, 3, causal=causal)
    # what the backends pass instead: max_seqlen_q >= 2 (flash), a window (varlen)
    full = flash_attn_varlen_func_emulated(q, k, v, cu_q, cu_k, 2, 3)
    windowed = flash_attn_varlen_func_emulated(q, k, v, cu_q, cu_k, 1, 3, window_size=(-1, 3))
    torch.testing.assert_close(windowed, full, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The varlen_attn stand-in


def _varlen(q, k, v, cu_q, cu_k, **kwargs):
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = torch.tensor(cu_k, dtype=torch.int32)
    max_q, max_k = int(cu_q.diff().max()), int(cu_k.diff().max())
    return varlen_attn_emulated(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


# Three batches: 2 queries over 5 keys, no query over 3 keys, 4 queries over 4 keys (GQA 4:2).
VARLEN_CU_Q, VARLEN_CU_K = [0, 2, 2, 6], [0, 5, 8, 12]


def _varlen_qkv():
    q, _, _ = random_qkv(6, 4, 2, seed=0)
    _, k, v = random_qkv(12, 4, 2, seed=1)
    return q, k, v


def _grouped_masked_attention(q, k, v, visible_QK):
    return _masked_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), visible_QK)


def test_varlen_stand_in_causal_window_aligns_bottom_right():
    q, k, v = _varlen_qkv()
    visible = torch.zeros(6, 12, dtype=torch.bool)
    visible[0, 0:4] = True  # query 0 of batch 0 sits at its key 5 - 2 + 0 = 3
    visible[1, 0:5] = True
    for i in range(4):  # equal lengths: plain causal over keys 8..11
        visible[2 + i, 8 : 8 + i + 1] = True
    out = _varlen(q, k, v, VARLEN_CU_Q, VARLEN_CU_K, window_size=(-1, 0), enable_gqa=True)
    torch.testing.assert_close(out, _grouped_masked_attention(q, k, v, visible))


def test_varlen_stand_in_full_windows_gqa_and_lse():
    q, k, v = _varlen_qkv()
    visible = torch.zeros(6, 12, dtype=torch.bool)
    visible[0:2, 0:5] = True
    visible[2:6, 8:12] = True
    expected = _grouped_masked_attention(q, k, v, visible)
    # (-1, max_k) is how the varlen backend asks for full attention: the same as (-1, -1)
    for window in [(-1, -1), (-1, 5)]:
        out = _varlen(q, k, v, VARLEN_CU_Q, VARLEN_CU_K, window_size=window, enable_gqa=True)
        torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        _varlen(q, k, v, VARLEN_CU_Q, VARLEN_CU_K)
    out, lse = _varlen(
        q, k, v, VARLEN_CU_Q, VARLEN_CU_K, enable_gqa=True, return_aux=SimpleNamespace(lse=True)
    )
    torch.testing.assert_close(out, expected)
    assert lse.shape == (4, 6) and lse.dtype == torch.float32 and torch.isfinite(lse).all()


# ---------------------------------------------------------------------------------------------
# GPU


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(
    not _flash_attn_importable(), reason="needs flash-attn: pip install splitvlm[gpu]"
)
@pytest.mark.parametrize("seed", range(4))
def test_flash_matches_sdpa_bf16_on_gpu(seed):
    layout = PackedLayout.from_docs(random_long_docs(random.Random(seed), 1000)).to("cuda")
    q, k, v = (t.cuda().bfloat16() for t in random_qkv(layout.num_tokens, 8, 2, seed, head_dim=64))
    grad_out = torch.randn_like(q)
    expected_out, expected_grads = _outputs_and_grads("sdpa", q, k, v, layout, grad_out)
    out, grads = _outputs_and_grads("flash", q, k, v, layout, grad_out)
    torch.testing.assert_close(out, expected_out, rtol=2e-2, atol=2e-2)
    for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-2, msg=f"d{name}")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_torch_varlen = pytest.mark.skipif(
    importlib.util.find_spec("torch.nn.attention.varlen") is None,
    reason="needs torch >= 2.10 (torch.nn.attention.varlen)",
)
# Image spans over 128 tokens with equal heads: where varlen_attn would hand a (-1, -1) window to
# cuDNN (sm90/sm100) instead of its flash kernel.
LONG_IMAGE_DOC = [("text", 7), ("image", 256), ("text", 5), ("image", 144), ("text", 3)]


@pytest.mark.gpu
@needs_cuda
@needs_torch_varlen
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("seed", range(3))
def test_varlen_matches_reference_on_gpu(seed, num_heads, num_kv_heads, dtype, tolerance):
    """Half-precision kernels against the fp32 dense reference on the same (rounded) inputs."""
    rng = random.Random(seed)
    docs = random_long_docs(rng, 1000) + [LONG_IMAGE_DOC]
    rng.shuffle(docs)
    layout = PackedLayout.from_docs(docs, backend="varlen").to("cuda")
    qkv = random_qkv(layout.num_tokens, num_heads, num_kv_heads, seed, head_dim=64)
    q, k, v = (t.cuda().to(dtype) for t in qkv)
    grad_out = torch.randn_like(q)
    expected_out, expected_grads = _outputs_and_grads(
        "reference", q.float(), k.float(), v.float(), layout, grad_out.float()
    )
    out, grads = _outputs_and_grads("varlen", q, k, v, layout, grad_out)
    torch.testing.assert_close(out.float(), expected_out, rtol=tolerance, atol=tolerance)
    for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(
            grad.float(), expected, rtol=tolerance, atol=tolerance, msg=f"d{name}"
        )


@pytest.mark.gpu
@needs_cuda
@needs_torch_varlen
@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 2), (4, 4)])
def test_varlen_attn_aligns_causal_bottom_right_with_unequal_lengths_on_gpu(
    num_heads, num_kv_heads
):
    """torch's own tests use equal query and key lengths only; the decomposition needs fewer
    queries than keys (bottom-right causal), zero-query batches (zero dK/dV) and max_q == 1."""
    from torch.nn.attention.varlen import varlen_attn

    lengths = [(2, 5), (0, 3), (4, 4), (1, 7), (0, 1), (130, 300), (17, 17)]  # (queries, keys)
    cu_q = torch.tensor([0, *accumulate(q for q, _ in lengths)], dtype=torch.int32)
    cu_k = torch.tensor([0, *accumulate(k for _, k in lengths)], dtype=torch.int32)
    max_q, max_k = max(q for q, _ in lengths), max(k for _, k in lengths)
    q, _, _ = random_qkv(int(cu_q[-1]), num_heads, num_kv_heads, seed=0, head_dim=64)
    _, k, v = random_qkv(int(cu_k[-1]), num_heads, num_kv_heads, seed=1, head_dim=64)
    q, k, v, cu_q, cu_k = (t.cuda() for t in (q, k, v, cu_q, cu_k))
    dummy_keys = torch.zeros(k.shape[0], dtype=torch.bool, device="cuda")
    for batch, (num_queries, _) in enumerate(lengths):
        if num_queries == 0:
            dummy_keys[cu_k[batch] : cu_k[batch + 1]] = True
    for window in [(-1, 0), (-1, max_k)]:  # causal, and full as the varlen backend asks for it
        half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        exact = [t.detach().float().requires_grad_() for t in half]
        kwargs = {"window_size": window, "enable_gqa": num_heads != num_kv_heads}
        out = varlen_attn(*half, cu_q, cu_k, max_q, max_k, **kwargs)
        expected = varlen_attn_emulated(*exact, cu_q, cu_k, max_q, max_k, **kwargs)
        grad_out = torch.randn_like(expected)
        out.backward(grad_out.bfloat16())
        expected.backward(grad_out)
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
        for name, leaf, exact_leaf in zip("qkv", half, exact, strict=True):
            torch.testing.assert_close(
                leaf.grad.float(), exact_leaf.grad, rtol=2e-2, atol=2e-2, msg=f"d{name} {window}"
            )
        assert (half[1].grad[dummy_keys] == 0).all() and (half[2].grad[dummy_keys] == 0).all()


@pytest.mark.gpu
@needs_cuda
@needs_torch_varlen
def test_auto_on_gpu_is_varlen_in_half_precision_and_sdpa_in_fp32():
    layout = PackedLayout.from_docs(random_long_docs(random.Random(0), 500), backend="auto")
    layout = layout.to("cuda")
    q, k, v = (t.cuda() for t in random_qkv(layout.num_tokens, 8, 2, seed=0, head_dim=64))
    # flash-attn's kernel has no fp32: varlen refuses it, and auto runs sdpa at fp32 accuracy
    with pytest.raises(RuntimeError):
        packed_attention(q, k, v, layout, backend="varlen")
    grad_out = torch.randn_like(q)
    expected_out, expected_grads = _outputs_and_grads("reference", q, k, v, layout, grad_out)
    out, grads = _outputs_and_grads("auto", q, k, v, layout, grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-4)
    for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4, msg=f"d{name}")
    half = [t.bfloat16() for t in (q, k, v)]
    assert torch.equal(
        packed_attention(*half, layout, backend="auto"),
        packed_attention(*half, layout, backend="varlen"),
    )


def test_a_layout_planned_for_one_backend_serves_it_and_names_the_fix_for_others():
    layout = PackedLayout.from_docs([[("text", 3), ("image", 2)]], backend="sdpa")
    assert layout.flash_calls is None and layout.flex_blocks is None
    q = torch.randn(5, 2, 8)
    reference = packed_attention(q, q, q, PackedLayout.from_docs([[("text", 3), ("image", 2)]]))
    assert torch.equal(packed_attention(q, q, q, layout, backend="sdpa"), reference)
    with pytest.raises(ValueError, match="no flash plan: build it with from_docs"):
        packed_attention(q, q, q, layout, backend="flash_emulated")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        PackedLayout.from_docs([[("text", 3)]], backend="fast")
