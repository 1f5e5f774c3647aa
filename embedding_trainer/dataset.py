"""Training images: scanning a folder, loading images and captions, aspect buckets and the per-epoch sample plan.

Scanning validates every file up front (decodes it once) and reports each unusable file with the reason and the
fix, instead of skipping it silently mid-run; a scan for a run keeps what it decoded for the run's training set, so a
run decodes each image once. The epoch plan is a pure function of (seed, epoch index), so a
resumed run replays exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import math
import os
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ConfigError, DatasetError
from .host import ImageInfo
from .log import logger

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 8  # the VAE downsamples 8x: a smaller image has no latent pixel
MIN_BUCKET_AREA = 0.85  # a bucket keeps at least this share of resolution**2 pixels

# Pillow >= 9.1 moved the filters into enums; older releases (and the WebUI's pinned one) only have constants.
try:
    _LANCZOS = Image.Resampling.LANCZOS
except AttributeError:  # pragma: no cover - old Pillow
    _LANCZOS = Image.LANCZOS  # type: ignore[attr-defined]

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Image.MAX_IMAGE_PIXELS is process-global: serialise our temporary change so two scans cannot interleave.
_LIMIT_LOCK = threading.Lock()


@dataclass
class ImageRecord:
    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) after EXIF orientation
    has_alpha: bool
    has_caption_file: bool = False  # the caption came from <image>.txt (else from the file name)


@dataclass
class DatasetProblem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


#: A decoded image: RGB (upright) and its alpha mask or None, as ``load_image`` returns them.
Decoded = tuple[Image.Image, "Image.Image | None"]
#: A file's size and modification time (nanoseconds), or None when it is missing: what tells a changed file.
Stamp = tuple[int, int] | None


@dataclass
class ScanResult:
    records: list[ImageRecord]
    problems: list[DatasetProblem]
    #: Decoded images by record index (``scan_dataset(keep_bytes=...)``): the training set built from this scan takes
    #: each once instead of decoding the file again.
    pixels: dict[int, Decoded] = field(default_factory=dict)
    #: Every image file seen and its caption file, with their stamps when scanned (see :meth:`unchanged`).
    stamps: dict[Path, Stamp] = field(default_factory=dict)
    folder: Path | None = None
    recursive: bool = False

    @property
    def captioned(self) -> int:
        """How many of the usable images have a caption file (the others' captions come from file names)."""
        return sum(1 for record in self.records if record.has_caption_file)

    def unchanged(self) -> bool:
        """Whether the folder holds the same image and caption files, of the same sizes and times, as when it was
        scanned: a listing and a stat per file, nothing decoded."""
        if self.folder is None:
            return False
        try:
            images = [p for p in _list_files(self.folder, self.recursive) if _is_image(p)]
        except OSError:
            return False
        return _stamps(images) == self.stamps


class _Problem(Exception):
    """One file cannot be used; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _open_lazily(path: Path) -> Image.Image:
    """Open ``path`` without decoding pixels, refusing images above PIL's decompression-bomb limit.

    PIL's own check warns (or raises) before we can learn the image's size; lifting the limit for the duration of
    the header read lets us report W x H and still never decode the huge image. The limit is restored at once.
    """
    with _LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    width, height = im.size
    if limit is not None and width * height > limit:
        im.close()
        scale = math.sqrt(limit / (width * height))
        raise _Problem(
            f"too large ({width} x {height} = {width * height} pixels); downscale it below {limit} pixels "
            f"(for example to {max(1, int(width * scale))} x {max(1, int(height * scale))})"
        )
    return im


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values at 255 (a 16-bit grey PNG turns white); scale them instead.
    arr = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and arr.max() > 255):
        arr = arr / 257.0
    elif im.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _orient(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - malformed EXIF must not make an otherwise good image unusable
        logger.warning("Ignoring unreadable EXIF orientation of %s: %s", getattr(im, "filename", "image"), e)
        return im
    return out if out is not None else im


def _split(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """RGB image and alpha mask ("L") or None, from any mode."""
    if im.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_l(im).convert("RGB"), None
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    if im.mode == "RGB":
        return im, None
    return im.convert("RGB"), None


def _decode(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    try:
        im.load()
    except Exception as e:  # every decoder failure means the same thing to the user
        raise _Problem(f"truncated or corrupt image data ({e}); re-export the image or remove it") from e
    oriented = _orient(im)
    try:
        rgb, alpha = _split(oriented)
    except Exception as e:
        raise _Problem(f"cannot convert its colour mode {im.mode} to RGB ({e}); re-save it as an RGB PNG") from e
    # The caller closes the opened file; an RGB image returned as-is would become unusable with it.
    return (rgb.copy() if rgb is im else rgb), alpha


def _load_checked(path: Path) -> tuple[Image.Image, Image.Image | None]:
    try:
        im = _open_lazily(path)
    except _Problem:
        raise
    except Image.UnidentifiedImageError as e:
        raise _Problem(
            "not a readable image (unknown or corrupt format); re-save it as PNG or JPEG, or remove it"
        ) from e
    except OSError as e:
        raise _Problem(f"cannot be read ({e.strerror or e}); check that it is complete and readable") from e
    except Exception as e:  # plugins raise SyntaxError, struct.error, ... on broken headers
        raise _Problem(f"not a readable image ({e}); re-save it as PNG or JPEG, or remove it") from e
    with im:
        return _decode(im)


def load_image(path: str | os.PathLike[str]) -> tuple[Image.Image, Image.Image | None]:
    """Load an image upright (EXIF orientation applied) as RGB, plus its alpha channel as an "L" mask or None.

    Palette transparency and a transparent colour count as alpha. Raises ``DatasetError`` naming the file.
    """
    path = Path(path)
    try:
        return _load_checked(path)
    except _Problem as e:
        raise DatasetError(f"images: {path}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Scanning


def _caption_from_name(stem: str) -> str:
    # "0001-a_red cat" -> "a red cat": numbering prefixes are not part of the description.
    text = re.sub(r"^[\d\s-]+", "", stem).replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


def _read_caption(image_path: Path) -> tuple[str, bool]:
    """The image's caption, and whether it came from its caption file (else from its file name)."""
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return _caption_from_name(image_path.stem), False
    try:
        raw = txt.read_bytes()
    except OSError as e:
        raise _Problem(
            f"caption file {txt} cannot be read ({e.strerror or e}); check its permissions or remove it"
        ) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Problem(
            f"caption file {txt} is not UTF-8 text (invalid byte at position {e.start}); save it as UTF-8"
        ) from e
    # Line breaks mean nothing to the tokenizer; keep the caption on one line so the prompt log stays readable.
    return re.sub(r"\s+", " ", text).strip(), True


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _stamp(path: Path) -> Stamp:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _stamps(images: list[Path]) -> dict[Path, Stamp]:
    stamps: dict[Path, Stamp] = {}
    for path in images:
        stamps[path] = _stamp(path)
        stamps[path.with_suffix(".txt")] = _stamp(path.with_suffix(".txt"))
    return stamps


def _list_files(folder: Path, recursive: bool) -> list[Path]:
    """Every non-hidden file under ``folder`` (sorted by relative path), following folder links once."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree would loop forever
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def scan_dataset(
    folder: str | os.PathLike[str], *, recursive: bool = False, min_images: int = 1, keep_bytes: int = 0
) -> ScanResult:
    """Find, decode and caption every image in ``folder``; unusable files are returned as problems.

    ``keep_bytes``: keep decoded images, up to that many bytes of pixels, in ``pixels`` for a training set (a run's
    scan; a check keeps none). Raises ``DatasetError`` when the folder is missing, holds no images, or fewer than
    ``min_images`` usable ones.
    """
    folder = Path(folder).expanduser()
    if min_images < 1:
        raise ConfigError("min_images", f"{min_images!r} is below the minimum 1")
    if not folder.exists():
        raise DatasetError(
            f"images: folder '{folder}' does not exist; check the path"
            + ("" if folder.is_absolute() else f" (relative paths start at '{Path.cwd()}')")
        )
    if not folder.is_dir():
        raise DatasetError(f"images: '{folder}' is a file, not a folder; give the folder that holds the images")

    try:
        files = _list_files(folder, recursive)
    except OSError as e:
        raise DatasetError(f"images: cannot list folder '{folder}' ({e.strerror or e}); check its permissions") from e
    images = [p for p in files if _is_image(p)]
    if not images:
        raise DatasetError(_no_images_message(folder, files, recursive))

    records: list[ImageRecord] = []
    problems: list[DatasetProblem] = []
    stamps = _stamps(images)  # before decoding: a file changed meanwhile looks changed to ``unchanged``
    pixels: dict[int, Decoded] = {}
    kept_bytes = 0
    for path in images:
        try:
            rgb, alpha = _load_checked(path)
            width, height = rgb.size
            if width < MIN_SIDE or height < MIN_SIDE:
                raise _Problem(
                    f"too small ({width} x {height}); images need at least {MIN_SIDE} pixels per side, "
                    "use a larger image"
                )
            caption, from_file = _read_caption(path)
        except _Problem as e:
            problems.append(DatasetProblem(path, str(e)))  # the caller reports them (a run: as its warnings)
            continue
        nbytes = width * height * (4 if alpha is not None else 3)
        if kept_bytes + nbytes <= keep_bytes:
            pixels[len(records)] = (rgb, alpha)
            kept_bytes += nbytes
        records.append(
            ImageRecord(
                path=path,
                caption=caption,
                size=(width, height),
                has_alpha=alpha is not None,
                has_caption_file=from_file,
            )
        )

    if len(records) < min_images:
        listed = "".join(f"\n  - {p}" for p in problems)
        skipped = f" {len(problems)} file(s) were skipped:{listed}\n" if problems else " "
        raise DatasetError(
            f"images: only {len(records)} readable image(s) in '{folder}', at least {min_images} needed (min_images)."
            f"{skipped}Fix: repair or remove the files listed, add more images, or lower min_images."
        )
    return ScanResult(records, problems, pixels, stamps, folder, recursive)


def _no_images_message(folder: Path, files: list[Path], recursive: bool) -> str:
    accepted = ", ".join(IMAGE_EXTENSIONS)
    message = f"images: no images in folder '{folder}' (accepted extensions: {accepted})."
    hints: list[str] = []
    others = sorted({p.suffix.lower() or p.name for p in files})
    if others:
        hints.append(f"It holds {len(files)} other file(s) ({', '.join(others[:8])}); convert images to PNG or JPEG.")
    if not recursive:
        try:
            subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            subdirs = []
        if subdirs:
            shown = ", ".join(subdirs[:5]) + (", ..." if len(subdirs) > 5 else "")
            hints.append(
                f"It has {len(subdirs)} sub-folder(s) ({shown}) that are not searched because recursive is off: "
                "turn recursive on to include them."
            )
    if not hints:
        hints.append("Put the training images (with optional same-named .txt captions) in this folder.")
    return " ".join([message, *hints])


# ----------------------------------------------------------------------------------------------------------------
# Buckets


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets with about ``resolution**2`` pixels (never more), sorted from tall to wide.

    Sides are multiples of ``step`` (8 below 256 px so tiny test resolutions still get buckets); the square
    ``(resolution, resolution)`` is always included.
    """
    if resolution < MIN_SIDE:
        raise ConfigError("resolution", f"{resolution!r} is too small for buckets; use at least {MIN_SIDE}")
    if step < 1 or max_aspect < 1.0:
        raise ConfigError("buckets", f"step {step!r} must be >= 1 and max_aspect {max_aspect!r} >= 1")
    if resolution < 256:
        step = min(step, 8)
    area = resolution * resolution
    # For each width up to the square's, the tallest height that keeps the area within budget and the aspect
    # within max_aspect (a bucket far below the budget would waste resolution); portrait sizes, then mirrored.
    tallest: dict[int, int] = {}
    for width in range(step, resolution + 1, step):
        height = min(area // width // step * step, int(width * max_aspect) // step * step)
        if height < resolution or width * height < MIN_BUCKET_AREA * area:
            continue
        tallest[height] = max(tallest.get(height, 0), width)  # same height: keep the larger area
    portrait = {(w, h) for h, w in tallest.items()}
    sizes = portrait | {(h, w) for w, h in portrait} | {(resolution, resolution)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def choose_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size`` (width, height) in log space."""
    if not buckets:
        raise ConfigError("buckets", "no bucket sizes to choose from")
    width, height = size
    if width <= 0 or height <= 0:
        raise DatasetError(f"images: invalid image size {width} x {height}")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


# ----------------------------------------------------------------------------------------------------------------
# Training set


@dataclass
class Sample:
    record_index: int
    flip: bool
    crop_x: float  # crop offset as a fraction of the slack: 0 left, 0.5 centre, 1 right
    crop_y: float


@dataclass
class RenderedSample:
    pixels: torch.Tensor  # [3, H, W] float32 in [-1, 1]
    mask: torch.Tensor | None  # [1, H, W] float32 in [0, 1], or None
    info: ImageInfo


@dataclass
class _Resized:
    rgb: Image.Image
    alpha: Image.Image | None
    original: tuple[int, int]  # (width, height) of the upright image
    nbytes: int


class TrainingSet:
    """The scanned records at one resolution: per-epoch batch plans and rendered (resized, cropped) samples."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        resolution: int,
        buckets: bool = False,
        crop: str = "center",
        flip: bool = False,
        repeats: int = 1,
        use_alpha_mask: bool = False,
        cache_bytes: int = 256 * 2**20,
        decoded: dict[int, Decoded] | None = None,
    ) -> None:
        """``decoded``: images the scan decoded already, by record index (``ScanResult.pixels``); each is taken out
        of it when first rendered, so it is not decoded again."""
        if not records:
            raise DatasetError("images: the training set is empty; scan a folder with at least one image")
        if resolution < MIN_SIDE:
            raise ConfigError("resolution", f"{resolution!r} is too small; use at least {MIN_SIDE}")
        if crop not in ("center", "random"):
            raise ConfigError("crop", f"{crop!r} is not allowed; choose one of: center, random")
        if repeats < 1:
            raise ConfigError("repeats", f"{repeats!r} is below the minimum 1")
        self.records = list(records)
        self.resolution = resolution
        self.buckets = buckets
        self.crop = crop
        self.flip = flip
        self.repeats = repeats
        self.use_alpha_mask = use_alpha_mask
        if buckets:
            sizes = bucket_sizes(resolution)
            self._targets = [choose_bucket(r.size, sizes) for r in self.records]
        else:
            self._targets = [(resolution, resolution)] * len(self.records)
        # Resized images (the costly part: decode + resize) keyed by record; every epoch renders the same files.
        self._cache: OrderedDict[int, _Resized] = OrderedDict()
        self._cache_bytes = max(0, cache_bytes)
        self._cached_bytes = 0
        self._decoded = decoded if decoded is not None else {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def cacheable(self) -> bool:
        """True when a sample's pixels depend only on (record_index, flip), so latents can be cached."""
        return self.crop == "center"

    def target_size(self, record_index: int) -> tuple[int, int]:
        return self._targets[record_index]

    def caption(self, record_index: int) -> str:
        return self.records[record_index].caption

    def batches_per_epoch(self, batch_size: int) -> int:
        """How many batches :meth:`epoch` returns (the same for every epoch)."""
        counts: dict[tuple[int, int], int] = {}
        for target in self._targets:
            counts[target] = counts.get(target, 0) + self.repeats
        return sum(math.ceil(n / batch_size) for n in counts.values())

    def epoch(self, epoch_index: int, batch_size: int, seed: int) -> list[list[Sample]]:
        """The batches of one epoch, a pure function of (seed, epoch_index); each batch has one target size."""
        if batch_size < 1:
            raise ConfigError("batch_size", f"{batch_size!r} is below the minimum 1")
        # A string seed is hashed with SHA-512 by random.Random: stable across processes and Python versions.
        rng = random.Random(f"{seed}:{epoch_index}")
        order = [i for i in range(len(self.records)) for _ in range(self.repeats)]
        rng.shuffle(order)
        groups: dict[tuple[int, int], list[Sample]] = {}
        for index in order:
            flip = self.flip and rng.random() < 0.5
            if self.crop == "random":
                crop_x, crop_y = rng.random(), rng.random()
            else:
                crop_x = crop_y = 0.5
            groups.setdefault(self._targets[index], []).append(Sample(index, flip, crop_x, crop_y))
        batches = [
            samples[start : start + batch_size]
            for samples in groups.values()
            for start in range(0, len(samples), batch_size)
        ]
        rng.shuffle(batches)
        return batches

    def render(self, sample: Sample) -> RenderedSample:
        """Pixels (and mask) of one sample: resized to cover the target, cropped at the offsets, flipped if asked."""
        target_w, target_h = self._targets[sample.record_index]
        resized = self._resized(sample.record_index)
        res_w, res_h = resized.rgb.size
        left = round(min(max(sample.crop_x, 0.0), 1.0) * (res_w - target_w))
        top = round(min(max(sample.crop_y, 0.0), 1.0) * (res_h - target_h))
        box = (left, top, left + target_w, top + target_h)

        arr = np.array(resized.rgb.crop(box), dtype=np.uint8)
        pixels = torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        mask = None
        if resized.alpha is not None:
            mask = torch.from_numpy(np.array(resized.alpha.crop(box), dtype=np.uint8)).float().div_(255.0)[None]
        if sample.flip:
            pixels = pixels.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
            # The flipped crop is the crop of the flipped image at the mirrored offset; SDXL should see that one.
            left = res_w - left - target_w
        info = ImageInfo(
            original_size=(resized.original[1], resized.original[0]),
            crop_top_left=(top, left),
            target_size=(target_h, target_w),
        )
        return RenderedSample(pixels=pixels.contiguous(), mask=mask, info=info)

    def _resized(self, index: int) -> _Resized:
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        record = self.records[index]
        decoded = self._decoded.pop(index, None)  # held once: the resized copy is what stays
        rgb, alpha = decoded if decoded is not None else load_image(record.path)
        if not self.use_alpha_mask:
            alpha = None
        width, height = rgb.size
        target_w, target_h = self._targets[index]
        # Scale so the image covers the target (the short side relative to the target fits exactly): no distortion.
        if target_w / width >= target_h / height:
            new_size = (target_w, max(target_h, round(height * target_w / width)))
        else:
            new_size = (max(target_w, round(width * target_h / height)), target_h)
        if new_size != (width, height):
            rgb = rgb.resize(new_size, _LANCZOS, reducing_gap=3.0)
            if alpha is not None:
                alpha = alpha.resize(new_size, _LANCZOS, reducing_gap=3.0)
        nbytes = new_size[0] * new_size[1] * (4 if alpha is not None else 3)
        entry = _Resized(rgb=rgb, alpha=alpha, original=(width, height), nbytes=nbytes)
        if nbytes <= self._cache_bytes:
            self._cache[index] = entry
            self._cached_bytes += nbytes
            while self._cached_bytes > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return entry
