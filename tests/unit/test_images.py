"""Preparing images for Gemini: formats, modes, orientation, limits."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.adapters.decode_price import (
    DECODE_BUDGET,
    Header,
    check_header,
    decode_estimate,
    webp_size,
)
from captioner.adapters.images import (
    _shrink,
    decode_cost,
    decoder_failures,
    prepare,
    sniff_format,
)
from captioner.errors import PermanentError
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
    assert isinstance(left, int)
    assert isinstance(right, int)
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
        (images.encode(images.solid((64, 64)), "BMP")[:80], "corrupt-image"),
        (images.other_formats()["heic"][0][:300], "corrupt-image"),
    ],
    ids=["empty", "text", "pdf", "truncated", "corrupt", "bomb", "truncated-bmp", "truncated-heic"],
)
def test_bad_input_is_a_permanent_error_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(PermanentError) as info:
        prepare(data)
    assert info.value.reason == reason


def test_pixel_limit_is_a_setting() -> None:
    data = images.encode(images.solid((300, 300)), "PNG")
    with pytest.raises(PermanentError, match="CAPTION_MAX_PIXELS"):
        prepare(data, max_pixels=10_000)


# Decode memory (issue 11): the estimate, the refusals, the shrink.

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        # One full-size copy in the image's own mode (1, 2 or 4 bytes a pixel), and
        # ~23 MiB of bands and small copies for the shrink.
        (Header("PNG", "L", 7070, 7070), 47 * MiB, 75 * MiB),
        (Header("PNG", "I;16", 7070, 7070), 95 * MiB, 122 * MiB),
        (Header("PNG", "RGBA", 7070, 7070), 190 * MiB, 215 * MiB),
        (Header("PNG", "LA", 7070, 7070), 190 * MiB, 215 * MiB),
        (Header("GIF", "P", 7070, 7070), 95 * MiB, 120 * MiB),
        # libwebp's two canvases, a bytes copy and the image: 16 bytes a pixel.
        (Header("WEBP", "RGB", 3900, 3900), 232 * MiB, DECODE_BUDGET),
        # A baseline JPEG is decoded at 1/8 scale: a few MB whatever its size.
        (Header("JPEG", "RGB", 8000, 6000, ((1, 1),) * 3), 1 * MiB, 30 * MiB),
        # Progressive: every coefficient is buffered, 2 bytes per sample (4:2:0 = 1.5).
        (Header("JPEG", "RGB", 8000, 6000, ((2, 2), (1, 1), (1, 1)), True), 137 * MiB, 165 * MiB),
    ],
    ids=["L", "I;16", "RGBA", "LA", "GIF-P", "WEBP", "JPEG", "JPEG-progressive-420"],
)
def test_decode_estimate_table(header: Header, low: int, high: int) -> None:
    assert low <= decode_estimate(header, 768) <= high


@pytest.mark.parametrize(
    "size", [(1, 49_000_000), (49_000_000, 1), (2, 24_500_000), (20000, 1), (763, 65500), (51, 1)]
)
def test_absurd_aspect_ratio_is_refused_from_the_header(size: tuple[int, int]) -> None:
    with pytest.raises(PermanentError) as info:
        check_header(Header("PNG", "L", *size), max_edge=768, max_pixels=50_000_000)
    assert info.value.reason == "bad-aspect-ratio"
    assert "50:1" in str(info.value)


def test_tiny_png_of_one_by_49_million_pixels_is_refused_before_decoding() -> None:
    with pytest.raises(PermanentError) as info:
        prepare(images.raw_png(1, 49_000_000))
    assert info.value.reason == "bad-aspect-ratio"


def test_huge_lossless_webp_is_refused_with_the_estimate_and_the_budget() -> None:
    data = images.solid_webp((7000, 7000))
    assert len(data) < 1000
    with pytest.raises(PermanentError) as info:
        prepare(data)
    assert info.value.reason == "too-large-to-decode"
    assert "770 MiB" in str(info.value)
    assert "256 MiB" in str(info.value)
    assert decode_cost(data) == 0  # refused from the header: costs nothing to try


_MODES = ["1", "L", "P", "I;16", "LA", "RGB", "RGBA", "CMYK"]


@settings(max_examples=400, deadline=None)
@given(
    fmt=st.sampled_from(["PNG", "GIF", "WEBP", "JPEG"]),
    mode=st.sampled_from(_MODES),
    width=st.integers(1, 1_000_000),
    height=st.integers(1, 1_000_000),
    buffered=st.booleans(),
    max_edge=st.sampled_from([64, 768, 4096]),
)
def test_any_header_is_refused_with_a_reason_or_fits_the_budget(
    fmt: str, mode: str, width: int, height: int, buffered: bool, max_edge: int
) -> None:
    header = Header(fmt, mode, width, height, ((1, 1),) * 3, buffered and fmt == "JPEG")
    refused: PermanentError | None = None
    try:
        cost = check_header(header, max_edge=max_edge, max_pixels=50_000_000)
    except PermanentError as exc:
        refused = exc
    if refused is not None:
        assert refused.reason in {"too-many-pixels", "bad-aspect-ratio", "too-large-to-decode"}
        assert f"{width}x{height}" in str(refused)
    else:
        assert 0 < cost <= DECODE_BUDGET
        assert width * height <= 50_000_000
        assert max(width, height) <= 50 * min(width, height)


@pytest.mark.parametrize(
    ("mode", "color"),
    [("RGBA", (10, 200, 30, 255)), ("LA", (90, 255)), ("P", 3), ("L", 77), ("RGB", (1, 2, 3))],
)
def test_band_by_band_shrink_matches_a_whole_image_thumbnail(mode: str, color: object) -> None:
    source = images.solid((3000, 1700), color, mode)
    source.paste(images.solid((900, 500), (255, 0, 0, 0) if mode == "RGBA" else 0, mode), (5, 7))
    if mode == "P":
        source.info["transparency"] = 0
    out = _shrink(source, 768)  # with bands of ~4 MiB: 87 rows of 3000 pixels
    whole = source.convert("RGBA")
    flat = Image.new("RGB", whole.size, (255, 255, 255))
    flat.paste(whole, mask=whole.getchannel("A"))
    flat.thumbnail((768, 768), Image.Resampling.BOX, reducing_gap=1.0)
    assert out.size == flat.size
    diff = max(abs(a - b) for a, b in zip(out.tobytes(), flat.tobytes(), strict=True))
    assert diff <= 2  # rounding: flattened then averaged, against averaged then flattened


def test_near_black_sixteen_bit_greyscale_stays_near_black() -> None:
    # Values up to 2000 of 65535, 3% of full scale. Scaled by its content's peak
    # (divided by 256 only when the peak passed 255) it came out up to 7 of 255 here,
    # but a peak of 255 or less was sent as is: 200/65535 became 200/255, light grey.
    row = b"".join(value.to_bytes(2, "little") for value in range(0, 2000, 2))
    image = Image.frombytes("I;16", (1000, 30), row * 30)
    out = decoded(prepare(images.encode(image, "PNG"), max_edge=768).data).convert("L")
    assert out.getextrema()[1] <= 2000 // 257 + 2  # type: ignore[operator]


def _gps_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    gps = exif.get_ifd(0x8825)
    gps[2] = (48.0, 51.0, 29.0)  # GPSLatitude
    gps[1] = "N"
    return exif


def test_small_jpeg_is_sent_without_its_gps_exif_comment_or_icc_profile() -> None:
    source = images.solid((200, 100), (30, 60, 90))
    data = images.encode(
        source, "JPEG", exif=_gps_exif(), comment=b"secret", icc_profile=b"x" * 300
    )
    assert b"Exif" in data
    out = prepare(data)
    assert not out.reencoded
    assert b"Exif" not in out.data
    assert b"secret" not in out.data
    assert b"ICC_PROFILE" not in out.data
    image = decoded(out.data)
    assert not image.getexif()
    assert image.tobytes() == decoded(data).tobytes()  # the pixels are untouched


def test_small_png_is_sent_without_text_chunks_or_exif() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Someone at 48.85N 2.35E")
    info.add_itxt("Comment", "private", zip=True)
    data = images.encode(images.solid((64, 64), (9, 9, 9, 128), "RGBA"), "PNG", pnginfo=info)
    data = images.encode(Image.open(io.BytesIO(data)), "PNG", pnginfo=info, exif=_gps_exif())
    out = prepare(data)
    assert not out.reencoded
    for marker in (b"tEXt", b"iTXt", b"eXIf", b"Someone"):
        assert marker not in out.data
    assert decoded(out.data).tobytes() == decoded(data).tobytes()


def test_small_webp_is_sent_without_exif() -> None:
    data = images.encode(images.solid((64, 64)), "WEBP", exif=_gps_exif(), lossless=True)
    assert b"EXIF" in data
    out = prepare(data)
    assert not out.reencoded
    assert b"EXIF" not in out.data
    assert decoded(out.data).tobytes() == decoded(data).tobytes()


def test_small_image_without_metadata_is_sent_byte_for_byte() -> None:
    data = images.encode(images.solid((64, 64)), "PNG")
    assert prepare(data).data is data


def test_sixteen_bit_image_with_a_dark_peak_is_not_stretched_to_light_grey() -> None:
    image = Image.frombytes("I;16", (100, 100), (200).to_bytes(2, "little") * 10000)
    out = decoded(prepare(images.encode(image, "PNG"), max_edge=768).data).convert("L")
    assert out.getextrema()[1] <= 1  # type: ignore[operator]  # 200/65535 of full scale, not 200/255


@pytest.mark.parametrize("kind", list(images.other_formats()))
def test_heic_avif_tiff_and_bmp_are_prepared_as_jpeg(kind: str) -> None:
    data, _ = images.other_formats()[kind]
    assert sniff_format(data) in ("HEIF", "AVIF", "TIFF", "BMP")
    prepared = prepare(data)
    assert prepared.mime_type == "image/jpeg"
    assert prepared.reencoded
    picture = Image.open(io.BytesIO(prepared.data))
    if kind == "tiff-two-pages":  # the first page (the photo), not the blue second one
        red, _green, blue = picture.convert("RGB").resize((1, 1)).getpixel((0, 0))  # type: ignore[misc]
        assert blue < red + 40


@pytest.mark.parametrize(
    ("fmt", "megapixels", "fits"),
    [("HEIF", 24, True), ("HEIF", 48, False), ("AVIF", 24, True), ("AVIF", 30, False)],
)
def test_heic_and_avif_decode_cost_follows_the_codec(fmt: str, megapixels: int, fits: bool) -> None:
    width = int((megapixels * 1_000_000 * 4 / 3) ** 0.5)
    header = Header(fmt, "RGB", width, width * 3 // 4)
    assert (decode_estimate(header, 768) <= DECODE_BUDGET) is fits


# Decoders that raised past prepare (issue 22): whatever a decoder raises on bytes we
# did not make is the image's fault, a PermanentError; prepare and decode_cost raise
# nothing else. (In this process, without the workers' limits: small inputs only.)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        # ZeroDivisionError in our own _coefficient_bytes.
        (lambda: images.progressive_jpeg_with_sampling(0, 1), "corrupt-image"),
        (lambda: images.progressive_jpeg_with_sampling(5, 1), "corrupt-image"),
        # OverflowError in Pillow's TIFF decoder set-up.
        (images.tiff_of_wide_tiles, "too-large-to-decode"),
        # RuntimeError from Pillow's AVIF plugin.
        (images.avif_without_image_item, "corrupt-image"),
        # RuntimeError "Security limit exceeded" from libheif.
        (lambda: images.heic_declaring(1, 1), "too-large-to-decode"),
        (lambda: images.heic_declaring(65536, 65536), "too-large-to-decode"),
    ],
    ids=["jpeg-sampling-0", "jpeg-sampling-5", "tiff-wide-tile", "avif-no-item", "heic-1x1",
         "heic-65536"],
)  # fmt: skip
def test_a_decoder_exception_is_a_permanent_error_with_a_reason(
    build: Callable[[], bytes], reason: str
) -> None:
    data = build()
    with pytest.raises(PermanentError) as info:
        prepare(data)
    assert info.value.reason == reason, str(info.value)
    assert decode_cost(data) >= 0  # never raises either


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), ZeroDivisionError(), OverflowError("x"), KeyError("k"), MemoryError()],
)
def test_decoder_failures_turns_any_exception_into_a_permanent_error(error: Exception) -> None:
    with pytest.raises(PermanentError) as info, decoder_failures():
        raise error
    expected = "too-large-to-decode" if isinstance(error, MemoryError) else "corrupt-image"
    assert info.value.reason == expected


def test_pillows_out_of_memory_decoder_error_is_too_large_to_decode() -> None:
    with pytest.raises(PermanentError) as info, decoder_failures():
        raise OSError("decoder error -9")
    assert info.value.reason == "too-large-to-decode"


def test_a_tiff_listing_more_strips_than_its_page_has_is_refused_from_the_header() -> None:
    with pytest.raises(PermanentError) as info:
        prepare(images.tiff_of_strips(count=1000))
    assert info.value.reason == "corrupt-image"
    assert "1000 strips or tiles where its 64x64 page has 64" in str(info.value)


def test_a_tiffs_declared_tile_is_priced_from_its_header() -> None:
    # libtiff reads a tile into a buffer of the tile's declared size.
    data = images.tiff_file(
        {256: (4, [64]), 257: (4, [64]), 258: (3, [8, 8, 8]), 259: (3, [8]), 262: (3, [2]),
         277: (3, [3]), 322: (4, [10000]), 323: (4, [10000]), 324: (4, [images.PAYLOAD]),
         325: (4, [16])},
        bytes(16),
    )  # fmt: skip
    with pytest.raises(PermanentError) as info:
        prepare(data)
    assert info.value.reason == "too-large-to-decode"
    assert "64x64 TIFF (RGB) would take ~" in str(info.value)


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (images.solid_webp((7000, 7000)), (7000, 7000)),  # VP8L
        (images.solid_webp((300, 200), frames=2), (300, 200)),  # VP8X
        (images.encode(images.solid((300, 200)), "WEBP"), (300, 200)),  # VP8
        (images.webp_canvas(16384, 16384), (16384, 16384)),  # VP8X, no image
    ],
    ids=["VP8L", "VP8X-animated", "VP8", "VP8X-canvas-only"],
)
def test_a_webps_size_is_read_before_pillow_opens_it(data: bytes, size: tuple[int, int]) -> None:
    # Pillow's WebP plugin makes libwebp's canvases when it opens a file (392 MB for
    # 7000x7000), so the size is read from the bytes first.
    assert webp_size(data) == size
    if max(size) < 1000:
        assert Image.open(io.BytesIO(data)).size == size
