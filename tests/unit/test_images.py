"""Preparing images for Gemini: formats, modes, orientation, limits."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from captioner.errors import PermanentError
from captioner.images import prepare
from tests import images


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_small_jpeg_is_sent_as_is() -> None:
    data = images.photo("chelsea.jpg")  # 451x300
    out = prepare(data, max_edge=768)
    assert out.data is data
    assert not out.reencoded
    assert out.mime_type == "image/jpeg"


def test_large_jpeg_is_downscaled_to_the_longest_edge() -> None:
    out = prepare(images.photo("hubble_deep_field.jpg"), max_edge=768)  # 1000x872
    assert out.reencoded
    assert max(out.width, out.height) == 768
    assert decoded(out.data).size == (out.width, out.height)
    assert (out.source_width, out.source_height) == (1000, 872)


def test_max_edge_setting_is_honoured() -> None:
    out = prepare(images.photo("coffee.jpg"), max_edge=256)
    assert max(out.width, out.height) == 256


def test_twelve_megapixel_photo_becomes_small() -> None:
    big = Image.open(io.BytesIO(images.photo("coffee.jpg"))).resize((4000, 3000))
    out = prepare(images.encode(big, "JPEG", quality=90), max_edge=768)
    assert (out.width, out.height) == (768, 576)
    assert len(out.data) < 150_000


@pytest.mark.parametrize(
    ("mode", "fmt", "color"),
    [
        ("L", "PNG", 128),
        ("L", "JPEG", 128),
        ("CMYK", "JPEG", (0, 255, 255, 0)),
        ("RGBA", "PNG", (255, 0, 0, 128)),
        ("LA", "PNG", (100, 200)),
        ("P", "PNG", 3),
        ("1", "PNG", 1),
        ("I;16", "PNG", 40000),
        ("RGB", "WEBP", (10, 200, 30)),
        ("RGBA", "WEBP", (10, 200, 30, 100)),
        ("RGB", "GIF", (10, 200, 30)),
    ],
)
def test_every_supported_format_and_mode_prepares_to_a_decodable_image(
    mode: str, fmt: str, color: object
) -> None:
    data = images.encode(images.solid((1000, 500), color, mode), fmt)
    out = prepare(data, max_edge=768)
    image = decoded(out.data)
    assert image.size == (768, 384)
    assert image.mode in ("RGB", "L")


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    row = (32768).to_bytes(2, "little") * 450 + (65535).to_bytes(2, "little") * 450
    image = Image.frombytes("I;16", (900, 20), row * 20)  # 45:1, under the aspect limit
    out = decoded(prepare(images.encode(image, "PNG"), max_edge=768).data).convert("L")
    left, right = out.getpixel((100, 4)), out.getpixel((700, 4))
    assert 110 < left < 145  # half of full scale, not clipped to 255
    assert right > 240


def test_animated_gif_sends_its_first_frame() -> None:
    frames = [images.solid((100, 100), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50)
    prepared = prepare(out.getvalue())
    r, g, b = decoded(prepared.data).convert("RGB").getpixel((50, 50))  # type: ignore[misc]
    assert r > 200
    assert g < 50
    assert b < 50
    assert prepared.mime_type == "image/jpeg"


@pytest.mark.parametrize(("orientation", "size"), [(1, (80, 40)), (6, (40, 80)), (8, (40, 80))])
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]) -> None:
    out = prepare(images.jpeg_with_orientation(orientation), max_edge=768)
    assert decoded(out.data).size == size
    assert out.reencoded == (orientation != 1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"plain text that says it is a jpeg", "not-an-image"),
        (b"%PDF-1.7 not an image", "not-an-image"),
        (images.truncated_jpeg(), "corrupt-image"),
        (images.corrupt_jpeg(), "corrupt-image"),
        (images.png_bomb(), "too-many-pixels"),
        (images.encode(images.solid((64, 64)), "BMP"), "not-an-image"),
    ],
    ids=["empty", "text", "pdf", "truncated", "corrupt", "bomb", "bmp"],
)
def test_bad_input_is_a_permanent_error_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(PermanentError) as info:
        prepare(data)
    assert info.value.reason == reason


def test_pixel_limit_is_a_setting() -> None:
    data = images.encode(images.solid((300, 300)), "PNG")
    with pytest.raises(PermanentError, match="CAPTION_MAX_PIXELS"):
        prepare(data, max_pixels=10_000)
