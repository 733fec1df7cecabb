"""Image decoding (`trainer.data.decode.decode_rgb`): orientation, colour modes, DCT-scaled JPEG
decoding against a full decode, and the skip reasons for bytes that cannot be used."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from trainer.data.decode import DecodeError, decode_rgb

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255,) * 3


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def quadrants(width: int, height: int) -> Image.Image:
    """Red top left, green top right, blue bottom left, yellow bottom right."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    half_w, half_h = width // 2, height // 2
    for (x, y), colour in zip(
        [(0, 0), (half_w, 0), (0, half_h), (half_w, half_h)],
        [RED, GREEN, BLUE, YELLOW],
        strict=True,
    ):
        draw.rectangle([x, y, x + half_w - 1, y + half_h - 1], fill=colour)
    return image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients, a few sharp-edged shapes and noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    image = coarse.resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x, y, x + int(rng.integers(8, width // 3)), y + int(rng.integers(8, height // 3))]
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


# The stored image whose EXIF orientation displays it as given: the inverse of each
# orientation's transpose (ImageOps.exif_transpose applies the forward one).
STORED_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(displayed: Image.Image, orientation: int) -> bytes:
    method = STORED_FOR_ORIENTATION[orientation]
    stored = displayed.transpose(method) if method is not None else displayed
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def assert_quadrants(pixels: np.ndarray, tolerance: int = 40):
    height, width, _ = pixels.shape
    centres = {
        RED: (height // 4, width // 4),
        GREEN: (height // 4, 3 * width // 4),
        BLUE: (3 * height // 4, width // 4),
        YELLOW: (3 * height // 4, 3 * width // 4),
    }
    for colour, (y, x) in centres.items():
        got = pixels[y, x].astype(int)
        assert np.abs(got - colour).max() <= tolerance, (colour, got.tolist())


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(64, 48), (256, 192)], ids=["downscaled", "full-size"])
def test_exif_rotated_jpeg_comes_out_as_displayed(orientation, size):
    """Displayed 256x192; stored rotated/mirrored (192x256 for 5-8) with the EXIF tag saying how to
    show it. Downscaled (a 1/4-scale DCT decode of the stored frame) and at full size."""
    blob = with_orientation(quadrants(256, 192), orientation)
    if orientation >= 5:
        assert Image.open(io.BytesIO(blob)).size == (192, 256)
    pixels = decode_rgb(blob, 0, size)
    assert pixels.shape == (size[1], size[0], 3) and pixels.dtype == np.uint8
    assert_quadrants(pixels)


def _two_halves(mode: str, left, right, size=(32, 16)) -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def _palette_with_transparent_index() -> bytes:
    """P image: index 0 (black in the palette) transparent on the left, index 1 red on the right."""
    image = _two_halves("P", 0, 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    return encode(image, "PNG", transparency=0)


MODES = {
    # name: (encoded bytes, expected RGB of the left half, of the right half)
    "cmyk jpeg": (
        encode(_two_halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), "JPEG"),
        RED,
        (0,) * 3,
    ),
    "cmyk tiff": (
        encode(_two_halves("CMYK", (255, 0, 255, 0), (0, 0, 0, 0)), "TIFF"),
        GREEN,
        WHITE,
    ),
    "L": (encode(_two_halves("L", 30, 200), "PNG"), (30,) * 3, (200,) * 3),
    # PIL's own convert would clip 16-bit and float values at 255: all white.
    "I;16": (encode(_two_halves("I;16", 128 * 257, 65535), "PNG"), (128,) * 3, WHITE),
    "I": (encode(_two_halves("I", 64 * 257, 0), "TIFF"), (64,) * 3, (0,) * 3),
    "F": (encode(_two_halves("F", 0.5, 1.0), "TIFF"), (128,) * 3, WHITE),
    "P": (
        encode(
            _two_halves("RGB", (10, 200, 30), BLUE).convert("P", palette=Image.Palette.ADAPTIVE),
            "PNG",
        ),
        (10, 200, 30),
        BLUE,
    ),
    # Transparent pixels go onto white, whatever colour they hold.
    "P transparent": (_palette_with_transparent_index(), WHITE, RED),
    "LA": (encode(_two_halves("LA", (0, 0), (0, 128)), "PNG"), WHITE, (127,) * 3),
    "RGBA": (encode(_two_halves("RGBA", (0, 0, 255, 0), (0, 0, 255, 255)), "PNG"), WHITE, BLUE),
    "RGBA half": (
        encode(_two_halves("RGBA", (0, 0, 0, 128), (255, 0, 0, 64)), "PNG"),
        (127,) * 3,
        (255, 191, 191),
    ),
}


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("size", [(32, 16), (16, 8)], ids=["same-size", "downscaled"])
def test_colour_modes_decode_to_the_expected_rgb(name, size):
    blob, left, right = MODES[name]
    pixels = decode_rgb(blob, 0, size)
    assert pixels.shape == (size[1], size[0], 3) and pixels.dtype == np.uint8
    tolerance = 8 if "jpeg" in name else 1  # JPEG is lossy
    y = size[1] // 2
    for x, expected in ((size[0] // 4, left), (3 * size[0] // 4, right)):
        got = pixels[y, x].astype(int)
        assert np.abs(got - expected).max() <= tolerance, (name, expected, got.tolist())


def full_decode_and_resize(blob: bytes, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as image:
        upright = ImageOps.exif_transpose(image)  # the whole image, decoded at full size
        return np.asarray(upright.convert("RGB").resize(size, Image.BICUBIC))


@pytest.mark.parametrize("size", [(200, 150), (384, 288), (384, 384)])
def test_large_jpeg_decoded_small_matches_a_full_decode_and_resize(size):
    """1600x1200 to these sizes: the decoder scales by 1/8, 1/4 and 1/2 in the DCT domain, then
    resizes; the result is what a full-size decode and PIL's BICUBIC resize give, within the
    difference of the two ways of filtering (46-50 dB here)."""
    blob = encode(photo(1600, 1200), "JPEG", quality=90)
    reference = full_decode_and_resize(blob, size)
    pixels = decode_rgb(blob, 0, size)
    assert pixels.shape == reference.shape
    psnr = 10 * np.log10(255**2 / ((pixels.astype(np.float64) - reference) ** 2).mean())
    assert psnr > 42, psnr


@pytest.mark.parametrize(
    "name", ["png", "rotated jpeg"], ids=["png-no-dct-scaling", "rotated-jpeg-stored-frame"]
)
def test_resizing_is_pils_antialiased_bicubic(name):
    """Where no DCT scaling applies the output is PIL's BICUBIC resize of the full image to within
    1-2 levels. The rotated JPEG (stored 480x1920, displayed 1920x480, shown at 60x480) needs
    its full width: drafting in the displayed frame instead would decode it at 1/4 scale."""
    if name == "png":
        blob, size = encode(photo(1024, 768), "PNG"), (384, 288)
    else:
        exif = Image.Exif()
        exif[0x0112] = 6
        blob, size = encode(photo(480, 1920), "JPEG", quality=90, exif=exif.tobytes()), (60, 480)
    reference = full_decode_and_resize(blob, size)
    difference = np.abs(decode_rgb(blob, 0, size).astype(int) - reference)
    assert difference.max() <= 2, difference.max()


def test_truncated_corrupt_and_oversized_bytes_are_skipped_with_their_reason():
    jpeg = encode(photo(320, 240), "JPEG", quality=90)
    png = encode(photo(64, 48), "PNG")
    corrupt = {
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "jpeg header only": jpeg[:600],
        "truncated png": png[: len(png) // 2],
        "not an image": b"this is not an image at all",
        "empty": b"",
        "jpeg with garbage after the header": jpeg[:600] + bytes(range(256)) * 8,
    }
    for name, blob in corrupt.items():
        # Downscaled too: a DCT-scaled decode still reads every byte.
        for size in [(320, 240), (40, 30)]:
            with pytest.raises(DecodeError) as raised:
                decode_rgb(blob, 0, size)
            assert raised.value.reason == "image_corrupt", (name, size)
    with pytest.raises(DecodeError) as raised:
        decode_rgb(jpeg, 320 * 240 - 1, (32, 24))
    assert raised.value.reason == "image_too_large"
    assert decode_rgb(jpeg, 320 * 240, (32, 24)).shape == (24, 32, 3)


def test_malformed_exif_does_not_skip_the_image():
    blob = encode(quadrants(64, 48), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fjunk")
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        assert_quadrants(decode_rgb(blob, 0, (32, 24)))
