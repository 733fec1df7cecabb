"""Qwen-VL's grounding text (trainer/data/grounding.py): boxes in pixels in, integers in
[0, 1000) of their image to the model, and back to pixels out; through real shards and the
decoder, with a byte-level BPE tokenizer the test trains itself."""

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from streaming import StreamingDataset

from models.config import ModelConfig
from trainer.data.decode import DecodeError, SampleDecoder, load_tokenizer
from trainer.data.formats import convert
from trainer.data.grounding import (
    GROUNDING_TOKENS,
    grounding_hits,
    normalize_boxes,
    parse_boxes,
)
from trainer.inference import answer_text

SIZES = {"wide.png": (640, 320), "tall.png": (300, 500)}


def bpe_tokenizer(path: Path):
    """A byte-level BPE tokenizer (as Qwen's is): numbers and brackets split into pieces, so
    only the four tags can be single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["where is the dog ? the dog is at (12,345),(678,901) .", "a cat and a dog"] * 20
    special = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<image>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=special[2:],
    )
    tokenizer.save_pretrained(str(path))
    return path


def png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corners_become_bins_of_the_latest_image_before_them():
    texts = [
        "<ref>a</ref><box>(0,0),(639,319)</box> <image> <image>",  # before any image: the first
        "<ref>b</ref><box>(150, 250),(300.0,500)</box>",  # after both: the second (300 × 500)
        "<box>(-5,10),(9999,20)</box>",  # out of the image: clamped
    ]
    got = normalize_boxes(texts, [[640, 320], [300, 500]], "<image>")
    assert got[0].startswith("<ref>a</ref><box>(0,0),(998,996)</box>")
    assert got[1] == "<ref>b</ref><box>(500,500),(999,999)</box>"
    assert got[2] == "<box>(0,20),(999,40)</box>"


@pytest.mark.parametrize(
    "text, sizes, message",
    [
        ("<box>(1,2)</box>", [[10, 10]], "a <box> is not <box>(x1,y1),(x2,y2)</box>"),
        ("<box>(9,9),(1,1)</box>", [[10, 10]], "corners are out of order"),
        ("<box>(1,1),(2,2)</box>", [], "a <box> in a sample without images"),
    ],
)
def test_a_bad_box_is_one_clear_error(text, sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_boxes([text], sizes, "<image>")


def test_parsed_boxes_are_the_pixel_boxes_within_a_bin():
    box = (37.0, 101.0, 512.5, 300.0)
    (text,) = normalize_boxes(
        ["<ref>the dog</ref><box>({},{}),({},{})</box>".format(*box)], [[640, 320]], "<image>"
    )
    (parsed,) = parse_boxes(text, 640, 320)
    assert parsed.ref == "the dog"
    for got, want, extent in zip(parsed[1:], box, (640, 320, 640, 320), strict=True):
        assert abs(got - want) <= extent / 1000


def test_grounding_round_trips_through_shards_the_decoder_and_the_answer_text(tmp_path):
    for name, size in SIZES.items():
        (tmp_path / name).write_bytes(png(size))
    boxes = {"wide.png": (64, 32, 320, 288), "tall.png": (30, 450, 270, 499)}
    records = [
        {
            "id": name,
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nwhere is the dog ?"},
                {
                    "from": "gpt",
                    "value": "<ref>the dog</ref><box>({},{}),({},{})</box>".format(*box),
                },
            ],
        }
        for name, box in boxes.items()
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    tokenizer_path = bpe_tokenizer(tmp_path / "tokenizer")
    report = convert(
        tmp_path / "data.json",
        "llava",
        tmp_path / "shards",
        tokenizer=tokenizer_path,
        num_workers=1,
    )
    assert report.num_samples == 2 and report.skipped == {}
    cfg = ModelConfig(grounding=True)
    tokenizer = load_tokenizer(tokenizer_path, cfg)
    tag_ids = tokenizer.convert_tokens_to_ids(list(GROUNDING_TOKENS))
    decoder = SampleDecoder(tokenizer, cfg, max_tokens=512)
    dataset = StreamingDataset(local=str(tmp_path / "shards"), shuffle=False, batch_size=1)
    for index in range(len(dataset)):
        sample = dataset[index]
        doc = decoder(sample, index)
        ids = doc.input_ids[doc.target_mask].tolist()
        assert [ids.count(tag) for tag in tag_ids] == [1, 1, 1, 1]  # each tag one token
        width, height = SIZES[sample["id"]]
        (parsed,) = parse_boxes(answer_text(tokenizer, ids, cfg), width, height)
        assert parsed.ref == "the dog"
        want = boxes[sample["id"]]
        for got, pixel, extent in zip(parsed[1:], want, (width, height) * 2, strict=True):
            assert abs(got - pixel) <= extent / 1000
    # Without grounding the text is the source's, pixels and all.
    plain = SampleDecoder(load_tokenizer(tokenizer_path, ModelConfig()), ModelConfig(), 512)
    doc = plain(dataset[0], 0)
    assert "(64,32),(320,288)" in plain.tokenizer.decode(doc.input_ids[doc.target_mask].tolist())


def test_a_bad_box_is_skipped_as_an_invalid_record(tmp_path):
    tokenizer = load_tokenizer(bpe_tokenizer(tmp_path / "tokenizer"), ModelConfig(grounding=True))
    decoder = SampleDecoder(tokenizer, ModelConfig(grounding=True), max_tokens=512)
    sample = {"messages": [{"role": "user", "content": "a <box>(1,2),(3)</box>"}], "images": b""}
    with pytest.raises(DecodeError) as error:
        decoder(sample, 0)
    assert error.value.reason == "invalid_record" and "<box>" in error.value.detail


def test_an_answer_counts_a_box_when_it_overlaps_the_reference_at_iou_half():
    reference = "<ref>a</ref><box>(100,100),(300,300)</box> <ref>b</ref><box>(0,0),(10,10)</box>"
    close = "<ref>a</ref><box>(120,110),(310,300)</box> <ref>b</ref><box>(500,500),(600,600)</box>"
    assert grounding_hits(close, reference) == (1, 2)  # a: IoU 0.85; b: no overlap
    assert grounding_hits("no box at all", reference) == (0, 2)
    assert grounding_hits(reference, reference) == (2, 2)
    assert grounding_hits("anything", "no boxes") == (0, 0)
