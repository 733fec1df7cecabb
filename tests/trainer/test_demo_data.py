import random

import pytest
import torch
from streaming import StreamingDataset
from transformers import AutoTokenizer

from models.config import ModelConfig
from trainer.data.decode import DecodeError, SampleDecoder
from trainer.data.demo import make_sample, write_demo
from trainer.data.shards import pack_blobs, unpack_blobs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    write_demo(out, sizes={"train": 60, "heldout": 10}, seed=3)
    return out


def test_blobs_round_trip():
    blobs = [b"", b"abc", bytes(range(256)) * 3]
    assert unpack_blobs(pack_blobs(blobs)) == blobs
    with pytest.raises(ValueError, match="truncated"):
        unpack_blobs(pack_blobs([b"abcdef"])[:-1])


def test_mds_round_trip_equals_what_was_written(demo):
    # Regenerate the same samples the writer saw (same seed, same order) and compare field by field.
    rng = random.Random(3 * 1000)
    expected = [make_sample(i, rng) for i in range(60)]
    dataset = StreamingDataset(local=str(demo / "train"), shuffle=False, batch_size=1)
    assert len(dataset) == 60
    for index, want in enumerate(expected):
        got = dataset[index]
        assert got["id"] == f"demo-train-{index:07d}"
        assert got["text"] == want["text"]
        assert got["messages"] == want["messages"]
        assert unpack_blobs(got["images"]) == want["images"]
        assert got["image_sizes"] == want["image_sizes"]


def test_splits_differ_and_token_counts_are_exact(demo):
    tokenizer = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    decoder = SampleDecoder(tokenizer, ModelConfig(), max_tokens=512)
    train = StreamingDataset(local=str(demo / "train"), shuffle=False, batch_size=1)
    heldout = StreamingDataset(local=str(demo / "heldout"), shuffle=False, batch_size=1)
    train_images = {train[i]["images"] for i in range(30)} - {b""}
    heldout_images = {heldout[i]["images"] for i in range(10)} - {b""}
    assert train_images and heldout_images and train_images.isdisjoint(heldout_images)
    n_image = ModelConfig().num_image_tokens()
    for index in range(60):
        raw = train[index]
        doc = decoder(raw, index)
        # The stored count covers text and markers; each image adds its span of image tokens.
        assert doc.num_tokens == raw["num_text_tokens"] + n_image * len(raw["image_sizes"])
        assert tokenizer.unk_token_id not in doc.input_ids.tolist()


def test_decode_marks_spans_targets_and_masks(demo):
    tokenizer = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    cfg = ModelConfig(mask_rate_min=0.5, mask_rate_max=0.5)
    decoder = SampleDecoder(tokenizer, cfg, max_tokens=512)
    rng = random.Random(0)
    sample = next(s for s in (make_sample(i, rng) for i in range(50)) if s["messages"])
    sample["images"] = pack_blobs(sample["images"])
    doc = decoder(sample, 7)
    kinds = [k for k, _ in doc.segments]
    assert kinds == ["text", "image", "text"]
    start = doc.segments[0][1]
    assert doc.input_ids[start - 1] == tokenizer.convert_tokens_to_ids("<image_start>")
    assert doc.input_ids[start + cfg.num_image_tokens()] == tokenizer.convert_tokens_to_ids(
        "<image_end>"
    )
    # Loss only on the assistant's answer and the closing eos.
    answer = tokenizer(sample["messages"][1]["content"], add_special_tokens=False)["input_ids"]
    assert doc.input_ids[doc.target_mask].tolist() == answer + [tokenizer.eos_token_id]
    assert int(doc.image_mask.sum()) == cfg.num_image_tokens() // 2
    # Masks are a function of (seed, epoch, sample index): equal on replay, different per epoch.
    assert torch.equal(decoder(sample, 7).image_mask, doc.image_mask)
    assert not all(
        torch.equal(decoder(sample, 7, epoch=e).image_mask, doc.image_mask) for e in range(1, 4)
    )


def test_decode_errors_are_counted_reasons(demo):
    tokenizer = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    decoder = SampleDecoder(tokenizer, ModelConfig(), max_tokens=20)
    cases = {
        "empty": {"text": "", "messages": [], "images": b""},
        "too_long": {"text": "count : " + "one " * 40, "messages": [], "images": b""},
        "image_corrupt": {
            "text": "",
            "messages": [{"role": "user", "content": "<image>"}],
            "images": pack_blobs([b"not a png"]),
        },
        "image_missing": {
            "text": "",
            "messages": [{"role": "user", "content": "<image>"}],
            "images": b"",
        },
    }
    for reason, sample in cases.items():
        with pytest.raises(DecodeError) as info:
            decoder(sample, 0)
        assert info.value.reason == reason
