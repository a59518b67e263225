"""The benchmark's images, made once with Pillow and cached under bench/data/ (gitignored).

Three kinds, as a photo bucket holds them:

- ``photo``: 12-megapixel JPEGs (4000x3000, 3000x4000 stored sideways with EXIF
  orientation 6 as phones do, or 3464x3464), upscaled from the real photographs
  in src/captioner_dev/photos and saved at quality 92.
- ``screenshot``: PNG screenshots synthesised from flat colours and text-like
  runs of glyph-sized boxes, some with a photo panel, at desktop and phone sizes.
- ``thumbnail``: small JPEGs (at most 320 px), which the pipeline sends as they are.

``grainy``: one extra 12 MP photo with sensor-like noise (about 4 MB, the size of
a real phone photo), used only to show how prepare's cost grows with file size.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageChops, ImageDraw

from captioner_dev import PHOTOS

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DATA = BENCH / "data"

# Bump when the generators change, so stale caches are not reused.
_VERSION = "v1"

Kind = Literal["photo", "screenshot", "thumbnail"]

# Out of every 20 objects: 12 photos, 5 screenshots, 3 thumbnails.
_MIX: tuple[Kind, ...] = (
    "photo",
    "screenshot",
    "photo",
    "thumbnail",
    "photo",
    "photo",
    "screenshot",
    "photo",
    "photo",
    "thumbnail",
    "photo",
    "screenshot",
    "photo",
    "photo",
    "screenshot",
    "photo",
    "thumbnail",
    "photo",
    "screenshot",
    "photo",
)

_CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}


@dataclass(frozen=True, slots=True)
class SourceImage:
    """One distinct file; objects in the bucket are copies of these under many names."""

    kind: Kind
    path: Path

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self.path.suffix]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True, slots=True)
class Catalogue:
    photos: tuple[SourceImage, ...]
    screenshots: tuple[SourceImage, ...]
    thumbnails: tuple[SourceImage, ...]
    grainy: SourceImage

    def of(self, kind: Kind) -> tuple[SourceImage, ...]:
        return {"photo": self.photos, "screenshot": self.screenshots, "thumbnail": self.thumbnails}[
            kind
        ]


def _save(image: Image.Image, path: Path, fmt: str, **options: object) -> None:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(out.getvalue())
    tmp.replace(path)


def _crop_to(image: Image.Image, aspect: float) -> Image.Image:
    """Centre crop to width/height == aspect."""
    width, height = image.size
    if width / height > aspect:
        new_width = round(height * aspect)
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    new_height = round(width / aspect)
    top = (height - new_height) // 2
    return image.crop((0, top, width, top + new_height))


def _twelve_megapixels(source: Path, *, portrait: bool) -> tuple[Image.Image, int]:
    """The upscaled photo as stored, and its EXIF orientation (1, or 6 for sideways)."""
    image = Image.open(source).convert("RGB")
    width, height = image.size
    if portrait:
        upright = _crop_to(image, 3 / 4).resize((3000, 4000), Image.Resampling.BICUBIC)
        # Phones store portrait shots sideways and say so in EXIF (orientation 6).
        return upright.transpose(Image.Transpose.ROTATE_90), 6
    if abs(width - height) < 0.05 * width:
        return _crop_to(image, 1.0).resize((3464, 3464), Image.Resampling.BICUBIC), 1
    return _crop_to(image, 4 / 3).resize((4000, 3000), Image.Resampling.BICUBIC), 1


def _save_photo(image: Image.Image, orientation: int, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x0110] = "bench phone"  # Model
    _save(image, path, "JPEG", quality=92, exif=exif.tobytes())


def _screenshot(width: int, height: int, seed: int, photo: Path | None) -> Image.Image:
    rng = random.Random(seed)
    dark = rng.random() < 0.3
    background = (30, 30, 35) if dark else rng.choice([(255, 255, 255), (245, 246, 248)])
    ink = (220, 220, 222) if dark else (40, 40, 48)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    bar = max(24, height // 20)
    draw.rectangle(
        (0, 0, width, bar), fill=rng.choice([(60, 90, 200), (45, 45, 50), (230, 232, 236)])
    )
    sidebar = int(width * 0.18) if width > height else 0
    if sidebar:
        draw.rectangle((0, bar, sidebar, height), fill=(45, 45, 52) if dark else (235, 237, 240))
    line = max(12, min(width, height) // 60)
    y = bar + line
    if photo is not None:
        # A picture in the page, as web pages and chats have.
        panel_width = int((width - sidebar) * 0.5)
        picture = Image.open(photo).convert("RGB")
        panel = picture.resize(
            (panel_width, round(panel_width * picture.height / picture.width)),
            Image.Resampling.BICUBIC,
        )
        image.paste(panel, (sidebar + 2 * line, y))
        y += panel.height + line
    while y < height - 2 * line:
        x = (sidebar + 2 * line) if rng.random() < 0.85 else line
        end = rng.randint(int(width * 0.5), width - line)
        while x < end:
            for _ in range(rng.randint(3, 10)):
                glyph_w = rng.randint(int(line * 0.35), int(line * 0.6))
                glyph_h = rng.randint(int(line * 0.45), int(line * 0.8))
                draw.rectangle((x, y + line - glyph_h, x + glyph_w, y + line), fill=ink)
                x += glyph_w + 2
            x += line // 2
        y += int(line * 1.6)
        if rng.random() < 0.08:
            button = rng.randint(80, 300)
            colour = rng.choice([(0, 120, 215), (16, 160, 80), (220, 60, 60)])
            draw.rounded_rectangle(
                (sidebar + 2 * line, y, sidebar + 2 * line + button, y + 2 * line),
                radius=6,
                fill=colour,
            )
            y += 3 * line
    return image


def _grainy(photo: Path, path: Path) -> None:
    image, orientation = _twelve_megapixels(photo, portrait=False)
    noise = Image.effect_noise(image.size, 6)
    grain = Image.merge("RGB", [noise, noise, noise])
    _save_photo(ImageChops.add(image, grain, scale=1.0, offset=-128), orientation, path)


def build(data: Path = DATA, *, log: bool = True) -> Catalogue:
    """Make whatever is missing under ``data`` and describe what is there."""
    root = data / _VERSION
    root.mkdir(parents=True, exist_ok=True)
    sources = sorted(PHOTOS.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"no photos in {PHOTOS}")
    made = 0

    photos = []
    for source in sources:
        path = root / f"photo-{source.stem}.jpg"
        if not path.exists():
            image, orientation = _twelve_megapixels(source, portrait=source.stem == "rocket")
            _save_photo(image, orientation, path)
            made += 1
        photos.append(SourceImage("photo", path))

    shots = []
    sizes = [(1920, 1080), (2560, 1440), (1170, 2532), (1440, 900), (1366, 768), (1080, 2400)]
    for index, (width, height) in enumerate(sizes):
        path = root / f"screenshot-{index}-{width}x{height}.png"
        if not path.exists():
            panel = sources[index % len(sources)] if index % 2 == 0 else None
            _save(_screenshot(width, height, index, panel), path, "PNG")
            made += 1
        shots.append(SourceImage("screenshot", path))

    thumbs = []
    for index, source in enumerate(sources[:6]):
        edge = (160, 256, 320)[index % 3]
        path = root / f"thumbnail-{source.stem}-{edge}.jpg"
        if not path.exists():
            image = Image.open(source).convert("RGB")
            image.thumbnail((edge, edge), Image.Resampling.LANCZOS)
            _save(image, path, "JPEG", quality=85)
            made += 1
        thumbs.append(SourceImage("thumbnail", path))

    grainy = root / "grainy-coffee.jpg"
    if not grainy.exists():
        _grainy(PHOTOS / "coffee.jpg", grainy)
        made += 1
    if log and made:
        print(f"made {made} benchmark images under {root}", flush=True)
    return Catalogue(tuple(photos), tuple(shots), tuple(thumbs), SourceImage("photo", grainy))


@dataclass(frozen=True, slots=True)
class Planned:
    """One object to upload: its name and which file it is a copy of."""

    name: str
    source: SourceImage


def plan(catalogue: Catalogue, prefix: str, count: int, *, kinds: str = "mix") -> list[Planned]:
    """``count`` object names under ``prefix``; ``kinds`` is ``mix`` or ``photo``."""
    counters = {"photo": 0, "screenshot": 0, "thumbnail": 0}
    planned = []
    for index in range(count):
        kind: Kind = _MIX[index % len(_MIX)] if kinds == "mix" else "photo"
        pool = catalogue.of(kind)
        source = pool[counters[kind] % len(pool)]
        counters[kind] += 1
        planned.append(Planned(f"{prefix}{index:05d}-{source.path.name}", source))
    return planned


def kinds_of(planned: list[Planned]) -> Iterator[tuple[Kind, int]]:
    for kind in ("photo", "screenshot", "thumbnail"):
        count = sum(1 for item in planned if item.source.kind == kind)
        if count:
            yield kind, count
