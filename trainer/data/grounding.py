"""Grounding text (Qwen-VL's): a phrase in `<ref>…</ref>` and its box in
`<box>(x1,y1),(x2,y2)</box>`, the top-left and bottom-right corners.

Samples hold boxes in pixels of their image (`image_sizes`, as shards store them), written in
that same syntax in the text, so a dataset's boxes go in as they are. With `model.grounding`
the decoder rewrites each box's corners to integers in [0, 1000) of the image's width and
height (`normalize_boxes`), which is what the model reads and writes, whatever size the image
is shown at; `parse_boxes` turns a model's text back into pixel boxes. `<ref>`, `</ref>`,
`<box>` and `</box>` are special tokens of the tokenizer (`GROUNDING_TOKENS`, added by
`prepare_tokenizer`). A box refers to the latest image before it in the document (the first
image when none is before it).
"""

from __future__ import annotations

import re
from typing import NamedTuple

GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>")
BINS = 1000  # normalized coordinates are integers in [0, BINS)

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(rf"<box>\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*</box>")
_REF = re.compile(r"<ref>(.*?)</ref>\s*$", re.S)


class Box(NamedTuple):
    """A box in pixels of its image, with the phrase in the `<ref>` just before it, if any."""

    ref: str | None
    x1: float
    y1: float
    x2: float
    y2: float


def _bin(value: float, extent: int) -> int:
    """A pixel coordinate of an `extent`-pixel side → its bin in [0, BINS); clamped."""
    return min(BINS - 1, max(0, int(value / extent * BINS)))


def normalize_boxes(texts: list[str], image_sizes: list[list[int]], placeholder: str) -> list[str]:
    """`texts` (a document's text pieces, in order) with every box's pixel corners as bins of
    its image's [width, height]; the image of a box is the latest `placeholder` before it.
    Raises ValueError on a `<box>` that is not two (x, y) corners, on corners out of order, or
    on a box in a document without images."""
    out, images_seen = [], 0
    for text in texts:
        pieces, cursor = [], 0
        for match in _BOX.finditer(text):
            before = text[cursor : match.start()]
            if "<box>" in before:
                raise ValueError("a <box> is not <box>(x1,y1),(x2,y2)</box>")
            images_seen += before.count(placeholder)
            if not image_sizes:
                raise ValueError("a <box> in a sample without images")
            width, height = image_sizes[max(0, images_seen - 1)]
            x1, y1, x2, y2 = (float(value) for value in match.groups())
            if x2 < x1 or y2 < y1:
                raise ValueError(f"a <box> whose corners are out of order: {match.group(0)}")
            corners = (_bin(x1, width), _bin(y1, height), _bin(x2, width), _bin(y2, height))
            pieces += [before, "<box>({},{}),({},{})</box>".format(*corners)]
            cursor = match.end()
        rest = text[cursor:]
        if "<box>" in rest:
            raise ValueError("a <box> is not <box>(x1,y1),(x2,y2)</box>")
        images_seen += rest.count(placeholder)
        out.append("".join(pieces) + rest)
    return out


def parse_boxes(text: str, width: int, height: int) -> list[Box]:
    """The boxes of a model's grounding text (corners in bins) in pixels of a `width` ×
    `height` image, each bin read as its centre; a box's ref is the `<ref>` right before it."""
    boxes, cursor = [], 0
    for match in _BOX.finditer(text):
        ref = _REF.search(text[cursor : match.start()])
        x1, y1, x2, y2 = (float(value) for value in match.groups())
        boxes.append(
            Box(
                ref.group(1).strip() if ref else None,
                (x1 + 0.5) / BINS * width,
                (y1 + 0.5) / BINS * height,
                (x2 + 0.5) / BINS * width,
                (y2 + 0.5) / BINS * height,
            )
        )
        cursor = match.end()
    return boxes


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 for a degenerate pair)."""
    width = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    height = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = width * height
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def grounding_hits(generated: str, reference: str, threshold: float = 0.5) -> tuple[int, int]:
    """(hits, boxes): of the reference text's boxes, how many the generated text's box in the
    same place (first with first, …) overlaps with IoU >= `threshold`; both texts in bins."""
    want = parse_boxes(reference, BINS, BINS)
    got = parse_boxes(generated, BINS, BINS)
    hits = sum(box_iou(a, b) >= threshold for a, b in zip(got, want, strict=False))
    return hits, len(want)
