"""A folder (or archive) of image files, in CompressAI's layout or split by a fixed rule.

Where the splits come from:

* ``root/train/``, ``root/val/`` or ``root/test/`` exist: they are the splits, as in
  CompressAI's ``ImageFolder`` (``val`` falls back to ``test/``; a folder with only ``test/``
  serves evaluation); asking for a split whose folder is missing is an error naming it;
* otherwise every image under ``root`` is listed (recursively, sorted by relative path) and
  the 1st, 11th, 21st, ... (index ``i % 10 == 0``) go to validation, the rest to training.
  With two images or more each split has at least one; a single image serves both splits
  (with a warning), which is handy for overfitting a codec on one picture. ``test`` and
  ``all`` of such a folder are every image: evaluation on Kodak measures all 24.

Files are recognised by extension (:data:`IMAGE_SUFFIXES`, any case); hidden files and
folders (``.name``, such as macOS's ``._photo.jpg``) and ``__MACOSX`` are ignored. Pixels are
used as stored (no EXIF rotation), converted to RGB.

Construction checks only what is cheap (the path exists, there are images); files are decoded
when first used, and a bad one raises a :class:`DataError` naming it then. :meth:`verify`
decodes everything at once and lists every bad file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image

from taskcodec.data.archive import ARCHIVE_SUFFIXES, extract, is_archive
from taskcodec.data.base import FOLDER_SPLITS, ImageDataset, check_split
from taskcodec.data.transforms import downscale, to_rgb, to_uint8_tensor
from taskcodec.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VAL_EVERY = 10
_IGNORED_DIRS = {"__MACOSX"}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by their path relative to it."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part in _IGNORED_DIRS for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(rel)
    return [folder / rel for rel in sorted(found, key=lambda p: p.as_posix())]


def split_by_rule(files: list[Path], split: str) -> list[Path]:
    """The fixed split of a flat list: index ``i % 10 == 0`` is validation."""
    if len(files) == 1:
        return list(files)
    in_val = [i % VAL_EVERY == 0 for i in range(len(files))]
    return [f for f, v in zip(files, in_val) if v == (split == "val")]


def _unwrap(folder: Path) -> Path:
    """An archive of ``dataset/...`` unpacks to one folder holding ``dataset``: step into it."""
    entries = [p for p in folder.iterdir()
               if not p.name.startswith(".") and p.name not in _IGNORED_DIRS]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "val",
                                                                              "test"):
        return entries[0]
    return folder


def _no_images(where: str) -> DataError:
    return DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {where}")


def _split_folders(folder: Path) -> dict[str, Path]:
    return {name: folder / name for name in ("train", "val", "test") if (folder / name).is_dir()}


def resolve_split(folder: Path, split: str) -> str:
    """``auto`` (what evaluation asks for): ``test``, else ``val``, of a folder with split
    subfolders; every image (``all``) of a folder without them."""
    if split != "auto":
        return split
    dirs = _split_folders(folder)
    return "test" if "test" in dirs else "val" if dirs else "all"


def find_files(root: Path, folder: Path, split: str) -> tuple[list[Path], str]:
    """The image files of ``split`` under ``folder`` (``root`` is what the user named) and a
    few words on how the split was made."""
    dirs = _split_folders(folder)
    label = str(root) if root == folder else f"archive {root}"
    if dirs:
        if split == "all":
            picked = list(dirs.values())
        else:
            # CompressAI's layout: val/ or, failing that, test/ is the validation split.
            wanted = ("val", "test") if split == "val" else (split,)
            picked = [dirs[name] for name in wanted if name in dirs][:1]
        if not picked:
            raise DataError(f"{label} has no {split}/ folder (it has "
                            f"{', '.join(d + '/' for d in dirs)}); add it or choose a split "
                            "that exists")
        files = [f for d in picked for f in list_images(d)]
        if not files:
            raise _no_images(f"{label} ({', '.join(d.name + '/' for d in picked)})")
        return files, (" + ".join(f"{d.name}/" for d in picked)
                       + (" folders" if len(picked) > 1 else " folder"))
    files = list_images(folder)
    if not files:
        raise _no_images(label)
    if split in ("all", "test"):  # a folder without splits is one set, e.g. Kodak's 24 images
        return files, "every image (no split folders)"
    if len(files) == 1:
        warnings.warn(f"only one image in {label}: it is used for both train and val",
                      stacklevel=3)
    return split_by_rule(files, split), f"every {VAL_EVERY}th file to val"


class ImageFolder(ImageDataset):
    """Images in a folder or a ``.zip``/``.tar``/``.tar.gz``/``.tgz`` archive.

    Args:
        root: a folder, or an archive unpacked once into the cache
            (see :func:`taskcodec.data.archive.cache_root`).
        split: ``"train"`` or ``"val"`` (see the module docstring for where they come from),
            ``"test"`` (the test/ folder), ``"all"`` (every image) or ``"auto"`` (see
            :func:`resolve_split`); a folder without split folders is all test images.
        max_side: downscale so the longer side is at most this; ``None`` (default) keeps the
            full resolution, so results on standard sets (Kodak, CLIC) stay comparable.
        crop: random crops if true, whole images if false; default: crops for ``"train"``.
        skip_bad: warn about and skip unreadable or too-small files instead of raising. Whole
            images are then all decoded at construction, so that a bad file is dropped rather
            than replaced by a repeat of another image.
        cache_mb: megabytes of decoded images kept in memory (see
            :class:`taskcodec.data.base.ImageDataset`).
        Other arguments: see :class:`taskcodec.data.base.ImageDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        patch_size: int | tuple[int, int] = 256,
        seed: int = 0,
        max_side: int | None = None,
        epoch_length: int | None = None,
        hflip: bool = False,
        crop: bool | None = None,
        skip_bad: bool = False,
        cache_mb: int = 0,
    ) -> None:
        if max_side is not None and (not isinstance(max_side, int) or isinstance(max_side, bool)
                                     or max_side < 1):
            raise ValueError(f"Invalid max_side {max_side!r}, should be a positive int or None")
        check_split(split, (*FOLDER_SPLITS, "auto"))
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"data set path does not exist: {root}")
        if is_archive(root):
            folder = _unwrap(extract(root))
        elif root.is_dir():
            folder = root
        else:
            raise DataError(f"not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}): {root}")
        split = resolve_split(folder, split)
        files, self.layout = find_files(root, folder, split)
        super().__init__([str(f) for f in files], source=str(root), split=split,
                         crop=split == "train" if crop is None else crop,
                         patch_size=patch_size, seed=seed, epoch_length=epoch_length,
                         hflip=hflip, skip_bad=skip_bad, cache_mb=cache_mb)
        self.root = folder
        self.max_side = max_side
        if skip_bad and not self.crop:
            self.drop_bad()

    def _load(self, i: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        path = self.names[i]
        try:
            with Image.open(path) as img:
                img.load()
                original = img.size
                rgb = to_rgb(img)
        except _DECODE_ERRORS as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise DataError(f"cannot read image {path}: {reason}") from None
        small = downscale(rgb, self.max_side)
        return to_uint8_tensor(small), (original if small.size != original else None)
