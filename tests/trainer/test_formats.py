"""Real data in: every shard format round-trips, every defect is skipped and counted (at shard
time and at decode time), and a mixture keeps its configured proportions."""

import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset
from transformers import AutoTokenizer

from cluster.cli import main as cli_main
from models.config import ModelConfig
from models.vision import normalize_pixels
from trainer.config import DataConfig, StreamConfig
from trainer.data.decode import DecodeError, SampleDecoder, prepare_tokenizer
from trainer.data.demo import save_tokenizer, vocabulary
from trainer.data.formats import MANIFEST, convert
from trainer.data.shards import pack_blobs, unpack_blobs, write_shards
from trainer.data.stream import StepBatches, build_streams, local_dir, streaming_kwargs
from trainer.distributed import WorldInfo

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def encode_image(fmt: str, size=(20, 12), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def read_shards(out: Path) -> list[dict]:
    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def decoder_for(tokenizer, **kwargs) -> SampleDecoder:
    return SampleDecoder(
        tokenizer, ModelConfig(), max_tokens=kwargs.pop("max_tokens", 512), **kwargs
    )


def targets(doc, tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(doc.input_ids[doc.target_mask].tolist())


def words(text: str, tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- every format round-trips: source → shards → stream → decoded sample -----------------------


def test_text_jsonl_round_trip(tmp_path, tokenizer_dir, tokenizer):
    texts = ["count : one two three", "a red circle at the top left .", "count : ten eleven"]
    source = tmp_path / "text.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n")
    report = convert(source, "text", tmp_path / "out", tokenizer=tokenizer_dir, num_workers=2)
    assert report.num_samples == 3 and report.skipped == {} and report.token_count == "exact"
    rows = read_shards(tmp_path / "out")
    assert [row["text"] for row in rows] == texts
    decoder = decoder_for(tokenizer)
    for index, (row, text) in enumerate(zip(rows, texts, strict=True)):
        doc = decoder(row, index)
        assert doc.num_tokens == row["num_text_tokens"]  # the stored count is exact
        assert targets(doc, tokenizer) == [*words(text, tokenizer), "<eos>"]  # loss on all text
        assert doc.input_ids[0] == tokenizer.bos_token_id and doc.segments == [
            ("text", len(doc.input_ids))
        ]


def test_llava_round_trip_keeps_image_bytes_and_assistant_loss(tmp_path, tokenizer_dir, tokenizer):
    images = {"a.png": encode_image("PNG", (20, 12)), "sub/b.jpg": encode_image("JPEG", (40, 24))}
    for name, blob in images.items():
        (tmp_path / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "img" / name).write_bytes(blob)
    records = [
        {
            "id": "one",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape ?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "what shape is it ?"},
                {"from": "gpt", "value": "square"},
            ],
        },
        {  # two images and no placeholder: both go in front of the first user turn
            "id": "two",
            "image": ["a.png", "sub/b.jpg"],
            "conversations": [
                {"from": "human", "value": "describe the image ."},
                {"from": "gpt", "value": "a red square"},
            ],
        },
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "count : one two"},
                {"from": "gpt", "value": "three"},
            ],
        },
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records))
    report = convert(
        source,
        "llava",
        tmp_path / "out",
        image_root=tmp_path / "img",
        tokenizer=tokenizer_dir,
        num_workers=1,
    )
    assert report.num_samples == 3 and report.skipped == {}
    rows = read_shards(tmp_path / "out")
    assert [row["id"] for row in rows] == ["one", "two", "text-only"]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "<image>\nwhat color is the shape ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "what shape is it ?"},
        {"role": "assistant", "content": "square"},
    ]
    assert rows[1]["messages"][0]["content"] == "<image>\n<image>\ndescribe the image ."
    # Images are the files' bytes, not re-encoded; sizes are [width, height].
    assert unpack_blobs(rows[0]["images"]) == [images["a.png"]]
    assert unpack_blobs(rows[1]["images"]) == [images["a.png"], images["sub/b.jpg"]]
    assert rows[1]["image_sizes"] == [[20, 12], [40, 24]] and rows[2]["image_sizes"] == []
    decoder = decoder_for(tokenizer)
    n_image = ModelConfig().num_image_tokens()
    expected_targets = [["red", "<eos>", "square", "<eos>"], ["a", "red", "square", "<eos>"]]
    for index, row in enumerate(rows):
        doc = decoder(row, index)
        num_images = len(row["image_sizes"])
        assert doc.num_tokens == row["num_text_tokens"] + n_image * num_images
        assert [kind for kind, _ in doc.segments].count("image") == num_images
        assert doc.pixel_values.shape[0] == num_images
        if index < 2:
            assert targets(doc, tokenizer) == expected_targets[index]


def test_captions_folder_round_trip_csv_and_jsonl(tmp_path, tokenizer_dir, tokenizer):
    folder = tmp_path / "captions"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode_image("PNG"))
    (folder / "b.jpg").write_bytes(encode_image("JPEG", (16, 16)))
    (folder / "metadata.csv").write_text(
        'file_name,caption\na.png,a red square\nb.jpg,"a blue circle , at the top"\n'
    )
    report = convert(folder, "captions", tmp_path / "csv", tokenizer=tokenizer_dir)
    assert report.num_samples == 2 and report.skipped == {}
    rows = read_shards(tmp_path / "csv")
    assert [row["id"] for row in rows] == ["a", "b"]
    assert [row["text"] for row in rows] == [
        "<image>a red square",
        "<image>a blue circle , at the top",
    ]
    assert unpack_blobs(rows[1]["images"]) == [(folder / "b.jpg").read_bytes()]
    doc = decoder_for(tokenizer)(rows[0], 0)
    assert [kind for kind, _ in doc.segments] == ["text", "image", "text"]
    assert targets(doc, tokenizer) == ["a", "red", "square", "<eos>"]  # caption loss

    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "text": "a red square"}) + "\n")
    convert(jsonl, "captions", tmp_path / "jsonl", image_root=folder)
    assert read_shards(tmp_path / "jsonl")[0]["text"] == "<image>a red square"


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_round_trip(tmp_path, tokenizer_dir, tokenizer):
    jpg, png = encode_image("JPEG"), encode_image("PNG")
    conversation = {
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is it ?"},
            {"from": "gpt", "value": "red"},
        ]
    }
    (tmp_path / "tars").mkdir()
    make_tar(
        tmp_path / "tars" / "part-0.tar",
        [
            ("x/0001.jpg", jpg),
            ("x/0001.txt", b"a red square"),
            ("x/0002.png", png),
            ("x/0002.json", json.dumps({"caption": "a red circle"}).encode()),
        ],
    )
    make_tar(
        tmp_path / "tars" / "part-1.tar",
        [("0003.json", json.dumps(conversation).encode()), ("0003.png", png)],
    )
    report = convert(tmp_path / "tars", "webdataset", tmp_path / "out", tokenizer=tokenizer_dir)
    assert report.num_samples == 3 and report.skipped == {}
    rows = read_shards(tmp_path / "out")
    assert [row["id"] for row in rows] == ["part-0/x/0001", "part-0/x/0002", "part-1/0003"]
    assert [row["text"] for row in rows[:2]] == ["<image>a red square", "<image>a red circle"]
    assert rows[2]["messages"][1] == {"role": "assistant", "content": "red"}
    assert [unpack_blobs(row["images"]) for row in rows] == [[jpg], [png], [png]]
    decoder = decoder_for(tokenizer)
    assert targets(decoder(rows[0], 0), tokenizer) == ["a", "red", "square", "<eos>"]
    assert targets(decoder(rows[2], 2), tokenizer) == ["red", "<eos>"]


# --- shard time: defects are listed, never stop the conversion; re-runs reproduce ---------------


def test_every_defect_is_skipped_and_counted_at_shard_time(tmp_path, tokenizer_dir):
    img = tmp_path / "img"
    img.mkdir()
    (img / "ok.png").write_bytes(encode_image("PNG"))
    (img / "big.png").write_bytes(encode_image("PNG", (300, 300)))
    (img / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (img / "truncated.jpg").write_bytes(encode_image("JPEG", (64, 64))[:200])

    def conv(image, user="<image>\nwhat color is it ?", answer="red", **extra):
        record = {
            "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
        }
        return {**({"image": image} if image else {}), **record, **extra}

    records = [
        conv("ok.png", id="good-1"),
        conv("missing.png", id="missing"),
        conv("corrupt.jpg", id="corrupt"),
        conv("truncated.jpg", id="truncated"),
        conv("big.png", id="bomb"),
        {"id": "empty", "conversations": []},
        conv("ok.png", user="<image> <image>", id="two-placeholders"),
        conv(["ok.png", "ok.png"], user="<image> one", id="unused"),
        conv(None, user="count :", answer="one " * 80, id="long"),
        conv(None, user="count :", id="bad-utf8", answer="BADBYTES"),
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}]},
        conv(None, user="count : one", id="good-2"),
    ]
    raw = json.dumps(records).encode().replace(b"BADBYTES", b"red \xff\xfe")
    (tmp_path / "llava.json").write_bytes(raw)
    report = convert(
        tmp_path / "llava.json",
        "llava",
        tmp_path / "out",
        image_root=img,
        tokenizer=tokenizer_dir,
        max_tokens=64,
        max_image_pixels=200 * 200,
        num_workers=2,
    )
    assert report.num_samples == 2
    assert report.skipped == {
        "invalid_record": 1,
        "invalid_utf8": 1,
        "empty": 1,
        "image_missing": 2,
        "image_unused": 1,
        "image_corrupt": 2,
        "image_too_large": 1,
        "too_long": 1,
    }
    assert [row["id"] for row in read_shards(tmp_path / "out")] == ["good-1", "good-2"]
    assert "missing.png not found" in report.examples["image_missing"][0]
    table = report.table()
    assert "image_too_large" in table and "bomb" in table

    lines = tmp_path / "text.jsonl"
    lines.write_bytes(
        b'{"text": "count : one"}\n{"text": \n{"text": "\xff\xfe"}\n{"text": "   "}\n'
        b'{"txt": "typo"}\n["a list"]\n{"text": "count : two"}\n'
    )
    report = convert(lines, "text", tmp_path / "text")
    assert report.num_samples == 2 and report.token_count == "estimate"
    assert report.skipped == {"invalid_json": 1, "invalid_utf8": 1, "empty": 1, "invalid_record": 2}

    tars = tmp_path / "tars"
    tars.mkdir()
    make_tar(tars / "a.tar", [("k1.png", encode_image("PNG")), ("k1.txt", b"a red square")])
    (tars / "b.tar").write_bytes((tars / "a.tar").read_bytes()[:700])  # cut inside a member
    make_tar(tars / "c.tar", [("k2.png", b"junk"), ("k2.txt", b"x"), ("k3.txt", b"\xff")])
    report = convert(tars, "webdataset", tmp_path / "wds")
    assert report.num_samples == 1
    assert report.skipped == {"invalid_utf8": 1, "image_corrupt": 1, "unreadable": 1}


def test_rerun_is_a_no_op_and_a_rewrite_is_byte_identical(tmp_path, tokenizer_dir):
    source = tmp_path / "text.jsonl"
    source.write_text("".join(json.dumps({"text": f"count : {w}"}) + "\n" for w in vocabulary()))

    def shard_bytes(out: Path) -> dict:
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != MANIFEST}

    first = convert(source, "text", tmp_path / "a", tokenizer=tokenizer_dir, size_limit=1 << 10)
    files = shard_bytes(tmp_path / "a")
    assert len([name for name in files if name.startswith("shard.")]) > 1
    again = convert(source, "text", tmp_path / "a", tokenizer=tokenizer_dir, size_limit=1 << 10)
    assert again.up_to_date and again.num_samples == first.num_samples
    # A forced rewrite (what an interrupted run does) produces the same bytes.
    convert(
        source, "text", tmp_path / "a", tokenizer=tokenizer_dir, size_limit=1 << 10, overwrite=True
    )
    assert shard_bytes(tmp_path / "a") == files
    assert not (tmp_path / "a.partial").exists()
    # A leftover partial directory from an interrupted run is discarded.
    (tmp_path / "b.partial").mkdir()
    (tmp_path / "b.partial" / "shard.00000.mds").write_bytes(b"half")
    convert(source, "text", tmp_path / "b", tokenizer=tokenizer_dir, size_limit=1 << 10)
    assert shard_bytes(tmp_path / "b") == files
    # A foreign, non-empty output directory is not overwritten by accident.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by splitvlm shards"):
        convert(source, "text", tmp_path / "c")


def test_cli_shards_prints_the_table_and_keeps_the_demo_command(tmp_path, capsys):
    source = tmp_path / "t.jsonl"
    source.write_text('{"text": "count : one"}\n{"text": ""}\n')
    out = tmp_path / "out"
    assert cli_main(["shards", str(source), "--format", "text", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 samples" in printed and "empty" in printed
    assert json.loads((out / MANIFEST).read_text())["report"]["skipped"] == {"empty": 1}
    assert cli_main(["shards", str(source), "--out", str(tmp_path / "x")]) == 2
    assert "--format is required" in capsys.readouterr().err
    assert cli_main(["shards", "demo", "--out", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "heldout" / "index.json").is_file()


# --- decode time: the chat template, and every defect skipped and counted while streaming -------


def chat_tokenizer(path: Path):
    """A word-level tokenizer with a ChatML template and no image tokens of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {
        w: i for i, w in enumerate(special + ["user", "assistant", "system"] + vocabulary()[9:])
    }
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def test_chat_template_renders_turns_and_masks_assistant_tokens(tmp_path):
    tokenizer = chat_tokenizer(tmp_path)
    size = len(tokenizer)
    assert prepare_tokenizer(tokenizer) == 2  # <image_start>, <image_end>; no role tokens needed
    assert len(tokenizer) == size + 2  # the model's vocab_size is len(tokenizer)
    sample = {
        "messages": [
            {"role": "system", "content": "count : one"},
            {"role": "user", "content": "<image>\nwhat color is it ?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "what shape ?"},
            {"role": "assistant", "content": "a square"},
        ],
        "images": pack_blobs([encode_image("PNG")]),
    }
    doc = decoder_for(tokenizer)(sample, 0)
    # Loss on each answer and the template's end-of-turn marker, never on a header or a prompt.
    assert targets(doc, tokenizer) == ["red", "<|im_end|>", "a", "square", "<|im_end|>"]
    tokens = tokenizer.convert_ids_to_tokens(doc.input_ids.tolist())
    assert tokens[:3] == ["<|im_start|>", "system", "count"]
    start = tokens.index("<image_start>")
    assert tokens[start + ModelConfig().num_image_tokens() + 1] == "<image_end>"
    # A template that renders the last turn differently cannot be split into turns.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}!{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DecodeError) as info:
        decoder_for(tokenizer)({"messages": sample["messages"][1:3], "images": sample["images"]}, 0)
    assert info.value.reason == "chat_template"


def write_samples(out: Path, samples: list[dict], compression="zstd", size_limit=1 << 26) -> None:
    rows = []
    for index, sample in enumerate(samples):
        row = {"id": f"s{index:04d}", "text": "", "messages": [], "images": [], "image_sizes": []}
        row.update(sample)
        row["num_text_tokens"] = 0
        rows.append(row)
    write_shards(out, rows, compression=compression, size_limit=size_limit)


def test_every_defect_is_skipped_and_counted_while_streaming(tmp_path, tokenizer):
    png = encode_image("PNG")
    user_image = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}]
    samples = [
        {"text": "count : one two"},
        {"messages": user_image, "images": [b"\x89PNG broken"]},  # image_corrupt
        {"messages": user_image, "images": []},  # image_missing
        {"messages": user_image, "images": [encode_image("PNG", (300, 300))]},  # image_too_large
        {"messages": []},  # empty
        {"messages": [{"role": "user", "content": "  "}]},  # empty
        {"text": "count : " + "one " * 600},  # too_long
        {"text": "PATCH_ME_TO_BAD_UTF8"},  # invalid_utf8
        {"messages": user_image, "images": [png]},
    ]
    data = tmp_path / "data"
    write_samples(data / "train", samples, compression=None)
    shard = data / "train" / "shard.00000.mds"
    content = shard.read_bytes()
    shard.write_bytes(content.replace(b"PATCH_ME_TO_BAD_UTF8", b"\xff" * 20))
    cfg = DataConfig(path=str(data), batch_size=len(samples), shuffle=False, max_tokens=256)
    decoder = decoder_for(tokenizer, max_tokens=256, max_image_pixels=200 * 200)
    batches = StepBatches(cfg, decoder, WorldInfo())
    docs, skipped = batches.next_step()
    assert sorted(doc.sample_id for doc in docs) == ["s0000", "s0008"]
    assert Counter(s.reason for s in skipped) == {
        "image_corrupt": 1,
        "image_missing": 1,
        "image_too_large": 1,
        "empty": 2,
        "too_long": 1,
        "invalid_utf8": 1,
    }
    assert batches.cursor.skipped == Counter(s.reason for s in skipped)


# --- mixtures ------------------------------------------------------------------------------------


def text_stream(root: Path, name: str, count: int) -> Path:
    samples = [{"id": f"{name}-{i}", "text": f"count : {name}"} for i in range(count)]
    write_samples(root / name / "train", samples)
    rows = read_shards(root / name / "train")
    assert len(rows) == count
    return root / name


def stream_counts(cfg: DataConfig, tokenizer, num_steps: int, num_workers: int = 0) -> tuple:
    cfg.num_workers = num_workers
    batches = StepBatches(cfg, decoder_for(tokenizer), WorldInfo())
    ids, counts = [], Counter()
    for _ in range(num_steps):
        docs, skipped = batches.next_step()
        assert not skipped
        ids.append([doc.sample_id for doc in docs])
        counts.update(doc.input_ids[3].item() for doc in docs)  # <bos> count : WORD <eos>
    names = {tokenizer.convert_tokens_to_ids(w): w for w in ("red", "blue", "green")}
    return ids, {names[k]: v for k, v in counts.items()}


def test_mixture_proportions_hold_over_10000_samples(tmp_path, tokenizer):
    for name, count in (("red", 400), ("blue", 250), ("green", 97)):
        text_stream(tmp_path, name, count)
    proportions = {"red": 0.6, "blue": 0.3, "green": 0.1}
    cfg = DataConfig(
        streams=[
            StreamConfig(path=str(tmp_path / n), proportion=p) for n, p in proportions.items()
        ],
        batch_size=100,
        shuffle_algo="py1e",
        shuffle_seed=7,
    )
    _, counts = stream_counts(cfg, tokenizer, num_steps=100)
    assert sum(counts.values()) == 10_000
    for name, proportion in proportions.items():
        assert abs(counts[name] / 10_000 - proportion) < 0.02, (name, counts)

    # Repeat factors are absolute: red 400 x 0.5, blue 250 x 2, green 97 x 1 per epoch.
    repeats = {"red": 0.5, "blue": 2.0, "green": 1.0}
    cfg.streams = [StreamConfig(path=str(tmp_path / n), repeat=r) for n, r in repeats.items()]
    cfg.shuffle_seed = 8
    _, counts = stream_counts(cfg, tokenizer, num_steps=100)
    epoch = 200 + 500 + 97
    for name, repeat in repeats.items():
        share = {"red": 400, "blue": 250, "green": 97}[name] * repeat / epoch
        assert abs(counts[name] / 10_000 - share) < 0.02, (name, counts)


def test_mixture_order_is_streamings_own_with_loader_workers_and_after_a_seek(tmp_path, tokenizer):
    for name, count in (("red", 300), ("blue", 200)):
        text_stream(tmp_path, name, count)
    cfg = DataConfig(
        streams=[
            StreamConfig(path=str(tmp_path / "red"), proportion=0.25),
            StreamConfig(path=str(tmp_path / "blue"), proportion=0.75),
        ],
        batch_size=16,
        epoch_size=320,
    )
    straight, _ = stream_counts(cfg, tokenizer, num_steps=25)  # crosses an epoch boundary
    with_workers, _ = stream_counts(cfg, tokenizer, num_steps=25, num_workers=2)
    assert with_workers == straight
    # The order is streaming's own: its iterator over the same streams and settings reads the
    # same samples, epoch after epoch.
    reference = StreamingDataset(
        streams=build_streams(cfg, cfg.split), **streaming_kwargs(cfg, cfg.batch_size)
    )
    expected = [sample["id"] for _epoch in range(2) for sample in reference]
    assert [i for step in straight for i in step] == expected[: 25 * 16]
    batches = StepBatches(cfg, decoder_for(tokenizer), WorldInfo())
    batches.seek(epoch=0, sample_in_epoch=16 * 7)
    assert [doc.sample_id for doc in batches.next_step()[0]] == straight[7]


def test_shards_are_prepared_ahead_of_the_reader_and_no_further(tmp_path, tokenizer):
    """A remote stream: once a step is read, the shards of the next 8 batches are downloaded in
    the background, and nothing beyond them."""
    rows = [{"text": f"count : {'red' if i % 2 else 'blue'} " * 20} for i in range(96)]
    write_samples(tmp_path / "remote" / "train", rows, compression=None, size_limit=1500)
    index = json.loads((tmp_path / "remote" / "train" / "index.json").read_text())
    first_sample = np.cumsum([0] + [shard["samples"] for shard in index["shards"]])[:-1]
    assert len(first_sample) >= 10
    stream = StreamConfig(remote=str(tmp_path / "remote"))
    # Unshuffled: samples in shard order, so "ahead" is easy to state.
    cfg = DataConfig(
        streams=[stream], cache_dir=str(tmp_path / "cache"), batch_size=4, shuffle=False
    )
    batches = StepBatches(cfg, decoder_for(tokenizer), WorldInfo())
    docs, _ = batches.next_step()
    assert [doc.sample_id for doc in docs] == ["s0000", "s0001", "s0002", "s0003"]

    local = local_dir(stream, cfg.cache_dir) / "train"
    names = [shard["raw_data"]["basename"] for shard in index["shards"]]
    # Asked for: 4 samples; ahead: streaming's predownload, 8 batches of 4. A shard is
    # prepared when its first sample is.
    wanted = {name for name, first in zip(names, first_sample, strict=True) if first < 4 + 32}
    assert 2 <= len(wanted) < len(names)
    deadline = time.monotonic() + 20
    while not all((local / name).is_file() for name in wanted) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # time enough to go further, were it going to
    assert {name for name in names if (local / name).is_file()} == wanted


def test_a_step_whose_samples_were_all_skipped_still_trains(tmp_path, demo_data):
    """Every rank runs its micro-batches even with nothing valid; the bad-data stop is clear."""
    from trainer.config import load_config
    from trainer.loop import DataError, train

    data = tmp_path / "bad"
    write_samples(data / "train", [{"messages": []} for _ in range(16)])
    base = [
        f"data.path={data}",
        f"data.tokenizer={demo_data / 'tokenizer'}",
        "data.batch_size=8",
        "run.log_every=1000",
        "run.steps=2",
        "logging.wandb.mode=disabled",
        "logging.plot=false",
    ]
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(
        repo / "yaml/tiny.yaml",
        [*base, f"run.dir={tmp_path / 'a'}", "data.max_bad_fraction=1.0"],
    )
    summary = train(cfg)
    assert summary["step"] == 2 and summary["skipped"] == {"empty": 16}
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["skipped"] for m in metrics] == [8, 8]
    # No targets, no loss to report (rather than a made-up 0.0).
    assert all("text_loss" not in m and m["micro_batches"] == 1 for m in metrics)

    cfg = load_config(
        repo / "yaml/tiny.yaml",
        [*base, f"run.dir={tmp_path / 'b'}", "data.bad_fraction_min_samples=8"],
    )
    with pytest.raises(DataError, match=r"8 of 8 samples skipped .* empty 8"):
        train(cfg)


def test_images_decode_to_uint8_pixels_the_model_normalizes(tokenizer):
    size = ModelConfig().vision.image_size
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (size, size), dtype=np.uint8)
    blobs = []
    for array in (exact, grey):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    blobs.append(encode_image("JPEG", (3 * size, 2 * size)))
    # A photo stored sideways (top half red, bottom half blue as displayed), EXIF orientation 6.
    upright = Image.new("RGB", (4 * size, 2 * size), (255, 0, 0))
    upright.paste((0, 0, 255), (0, size, 4 * size, 2 * size))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", exif=exif.tobytes())
    blobs.append(buffer.getvalue())
    sample = {
        "messages": [{"role": "user", "content": "<image> " * 4}],
        "images": pack_blobs(blobs),
    }
    sample["messages"].append({"role": "assistant", "content": "red"})
    pixels = decoder_for(tokenizer)(sample, 0).pixel_values
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, size, size)
    # At the model's size nothing is resampled: the stored pixels, exactly; grey becomes RGB.
    assert torch.equal(pixels[0], torch.from_numpy(exact).permute(2, 0, 1))
    assert all(torch.equal(pixels[1, c], torch.from_numpy(grey)) for c in range(3))
    # Larger images are resized; a flat colour stays (nearly) that colour.
    assert (pixels[2].float().mean(dim=(1, 2)) - torch.tensor([200.0, 30.0, 30.0])).abs().max() < 4
    # EXIF orientation applied: displayed upright, squashed to the square.
    top = pixels[3, :, size // 4].float().mean(dim=1)
    bottom = pixels[3, :, -size // 4].float().mean(dim=1)
    assert (top - torch.tensor([255.0, 0.0, 0.0])).abs().max() < 8, top
    assert (bottom - torch.tensor([0.0, 0.0, 255.0])).abs().max() < 8, bottom
    # SigLIP's normalization on the model side: 0 → -1, 255 → 1; floats pass through.
    assert normalize_pixels(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    floats = torch.randn(2, 3)
    assert normalize_pixels(floats) is floats
