"""What can honestly be said about an image without a model: size, colours, brightness."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from typing import Final

from PIL import Image, ImageChops, ImageStat

from captioner_dev.gemini_server.config import MAX_IMAGE_PIXELS

_PALETTE: Final[tuple[tuple[str, tuple[int, int, int]], ...]] = (
    ("black", (0, 0, 0)),
    ("dark grey", (64, 64, 64)),
    ("grey", (128, 128, 128)),
    ("light grey", (192, 192, 192)),
    ("white", (255, 255, 255)),
    ("dark red", (120, 15, 20)),
    ("red", (205, 35, 35)),
    ("pink", (240, 150, 180)),
    ("orange", (240, 140, 30)),
    ("brown", (125, 80, 45)),
    ("beige", (220, 200, 160)),
    ("yellow", (240, 220, 40)),
    ("olive", (120, 120, 30)),
    ("light green", (150, 220, 120)),
    ("green", (50, 160, 60)),
    ("dark green", (25, 80, 35)),
    ("teal", (0, 128, 128)),
    ("light blue", (150, 200, 240)),
    ("blue", (40, 90, 210)),
    ("dark blue", (20, 30, 100)),
    ("purple", (120, 50, 160)),
)


@functools.cache
def _palette_image() -> Image.Image:
    flat = [channel for _, rgb in _PALETTE for channel in rgb]
    # Unused slots repeat entry 0, so anything mapped there still reads as "black".
    flat += list(_PALETTE[0][1]) * (256 - len(_PALETTE))
    palette = Image.new("P", (1, 1))
    palette.putpalette(flat)
    return palette


@dataclass(frozen=True)
class ImageFacts:
    """What can honestly be said about an image without a model."""

    format: str
    width: int
    height: int
    greyscale: bool
    brightness: float
    colours: tuple[str, ...]
    sha256: str

    @property
    def orientation(self) -> str:
        if self.width == self.height:
            return "square"
        return "landscape" if self.width > self.height else "portrait"

    @property
    def fingerprint(self) -> str:
        return self.sha256[:8]

    @property
    def tag(self) -> str:
        return f"[img:{self.fingerprint}]"

    @property
    def brightness_words(self) -> str:
        if self.brightness < 40:
            return "very dark"
        if self.brightness < 90:
            return "fairly dark"
        if self.brightness < 165:
            return "of medium brightness"
        if self.brightness < 215:
            return "fairly bright"
        return "very bright"

    @property
    def colour_words(self) -> str:
        names = list(self.colours)
        if len(names) == 1:
            return f"almost entirely {names[0]}"
        if len(names) == 2:
            return f"mostly {names[0]} and {names[1]}"
        return f"mostly {', '.join(names[:-1])} and {names[-1]}"

    def phrase(self) -> str:
        tone = "greyscale" if self.greyscale else "colour"
        return (
            f"a {self.orientation} {self.width}x{self.height} {self.format} image in {tone}, "
            f"{self.colour_words}, {self.brightness_words}"
        )

    def alt(self) -> str:
        return (
            f"{self.orientation.capitalize()} {self.format} image, {self.colour_words} "
            f"(offline stand-in) {self.tag}"
        )

    def tags(self) -> list[str]:
        tags = [*self.colours, self.orientation]
        tags.append("greyscale" if self.greyscale else "colour")
        tags.append(self.format.lower())
        return list(dict.fromkeys(tags))


_EXIF_ORIENTATION: Final = 0x0112


def describe_image_bytes(data: bytes) -> ImageFacts:
    """Computes ImageFacts, raising ValueError when the bytes are not a decodable image."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            # Checked before load() so a tiny file cannot make the stub decode a pixel bomb.
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image has {width * height} pixels")
            fmt = im.format or "unknown"
            # Rotated phone photos are stored sideways; describe them as they are displayed.
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            if fmt == "JPEG":
                im.draft("RGB", (256, 256))
            im.thumbnail((64, 64))
            rgb = im.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:  # Pillow's decoders raise a zoo of types for bad input.
        raise ValueError(str(exc) or type(exc).__name__) from exc
    red, green, blue = rgb.split()
    spread = ImageChops.lighter(
        ImageChops.lighter(ImageChops.difference(red, green), ImageChops.difference(green, blue)),
        ImageChops.difference(red, blue),
    )
    greyscale = ImageStat.Stat(spread).mean[0] < 6.0
    brightness = ImageStat.Stat(rgb.convert("L")).mean[0]
    indexed = rgb.quantize(palette=_palette_image(), dither=Image.Dither.NONE)
    counts = sorted(indexed.getcolors(256) or [], reverse=True)
    total = sum(count for count, _ in counts) or 1
    colours: list[str] = []
    for count, index in counts:
        name = _PALETTE[index][0] if isinstance(index, int) and index < len(_PALETTE) else "black"
        if name in colours:
            continue
        if colours and (count / total < 0.12 or len(colours) == 3):
            break
        colours.append(name)
    return ImageFacts(
        format=fmt,
        width=width,
        height=height,
        greyscale=greyscale,
        brightness=brightness,
        colours=tuple(colours) or ("black",),
        sha256=digest,
    )
