"""A procedurally generated, learnable image+text task, so everything runs with no network.

Each image is a coloured shape in one quadrant of a noisy background. Samples are captions
("a red circle at the top left ."), questions about colour, shape or position, and text-only
counting sequences. A word-level tokenizer over the task's vocabulary is saved next to the shards
as a real transformers tokenizer, loaded with `AutoTokenizer.from_pretrained` like any other.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

from trainer.data.shards import (
    IMAGE_PLACEHOLDER,
    SHARD_SIZE_LIMIT,
    estimate_text_tokens,
    write_shards,
)

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
QUESTIONS = {
    "color": "what color is the shape ?",
    "shape": "what shape is it ?",
    "position": "where is the shape ?",
}
SPECIAL_TOKENS = (
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<|user|>",
    "<|assistant|>",
    "<image_start>",
    "<image_end>",
    IMAGE_PLACEHOLDER,
)
SPLITS = {"train": 6000, "heldout": 400}


def render_shape(
    color: str, shape: str, position: str, rng: random.Random, size: int | tuple[int, int] = 32
) -> bytes:
    """PNG bytes of one shape on a noisy dark background; `size`: a side, or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    image = Image.new("RGB", (width, height))
    pixels = image.load()
    for y in range(height):
        for x in range(width):
            grey = rng.randint(10, 60)
            pixels[x, y] = (grey, grey, grey)
    draw = ImageDraw.Draw(image)
    half_width, half_height = width // 2, height // 2
    half = min(half_width, half_height)
    extent = rng.randint(half * 5 // 8, half - 2)
    left = (half_width if "right" in position else 0) + rng.randint(1, half_width - extent - 1)
    top = (half_height if "bottom" in position else 0) + rng.randint(1, half_height - extent - 1)
    box = (left, top, left + extent, top + extent)
    fill = COLORS[color]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(
            [(left, top + extent), (left + extent, top + extent), (left + extent // 2, top)],
            fill=fill,
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_sample(
    index: int,
    rng: random.Random,
    image_size: int = 32,
    image_sizes: list[tuple[int, int]] | None = None,
) -> dict:
    """One demo sample; `image_sizes`: draw each image's (width, height) from these (images at
    their own aspect ratio) instead of `image_size` squares."""
    kind = rng.choices(("caption", "question", "text", "draw"), weights=(3, 5, 2, 1))[0]
    sample = {
        "id": f"demo-{index:07d}",
        "text": "",
        "messages": [],
        "images": [],
        "image_sizes": [],
    }
    if kind == "text":
        start = rng.randint(0, 10)
        count = rng.randint(4, 10)
        sample["text"] = "count : " + " ".join(NUMBERS[start : start + count])
        return sample
    color, shape, position = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(POSITIONS)
    size = rng.choice(image_sizes) if image_sizes else (image_size, image_size)
    sample["images"] = [render_shape(color, shape, position, rng, size)]
    sample["image_sizes"] = [list(size)]
    if kind == "draw":  # text → image: the image is the assistant's answer
        sample["messages"] = [
            {"role": "user", "content": f"draw a {color} {shape} at the {position} ."},
            {"role": "assistant", "content": IMAGE_PLACEHOLDER},
        ]
        return sample
    if kind == "caption":
        prompt, answer = "describe the image .", f"a {color} {shape} at the {position} ."
    else:
        topic = rng.choice(list(QUESTIONS))
        prompt = QUESTIONS[topic]
        answer = {"color": color, "shape": shape, "position": position}[topic]
    sample["messages"] = [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
        {"role": "assistant", "content": answer},
    ]
    return sample


def vocabulary() -> list[str]:
    words = set("count : a at the . ? describe draw image what color is shape it where".split())
    words |= set(NUMBERS) | set(SHAPES) | set(COLORS)
    words |= {word for position in POSITIONS for word in position.split()}
    return list(SPECIAL_TOKENS) + sorted(words)


def save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
    )
    tokenizer.save_pretrained(str(out))


def write_demo(
    out: Path,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    size_limit: int = SHARD_SIZE_LIMIT,
    image_sizes: list[tuple[int, int]] | None = None,
) -> dict[str, int]:
    """Write the demo splits (MDS, shards of at most `size_limit` bytes) and the tokenizer under
    `out`; returns samples per split. `image_sizes`: as for `make_sample`."""
    out = Path(out)
    save_tokenizer(out / "tokenizer")
    written = {}
    for offset, (split, count) in enumerate((sizes or SPLITS).items()):
        rng = random.Random(seed * 1000 + offset)

        def samples(rng=rng, count=count, split=split):
            for index in range(count):
                sample = make_sample(index, rng, image_sizes=image_sizes)
                sample["id"] = f"demo-{split}-{index:07d}"
                # Exact for the demo's word-level tokenizer.
                sample["num_text_tokens"] = estimate_text_tokens(sample)
                yield sample

        written[split] = write_shards(out / split, samples(), size_limit=size_limit)
    return written
