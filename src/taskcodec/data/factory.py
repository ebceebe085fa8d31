"""One entry point from a config's ``data`` string to a data set, and a line to log about it."""

from __future__ import annotations

from torch.utils.data import Dataset

from taskcodec.data.base import ImageDataset, check_split
from taskcodec.data.embedded import DEFAULT_MAX_SIDE, EmbeddedImages
from taskcodec.data.folder import ImageFolder

EMBEDDED = "embedded"


def build_dataset(
    source: str,
    split: str,
    *,
    patch_size: int | tuple[int, int] = 256,
    seed: int = 0,
    max_side: int | None = DEFAULT_MAX_SIDE,
    skip_bad: bool = False,
    epoch_length: int | None = None,
    hflip: bool = False,
    crop: bool | None = None,
) -> Dataset:
    """The ``split`` (``"train"`` or ``"val"``) of ``source``.

    ``source`` is ``"embedded"`` (scikit-image's photographs; write ``./embedded`` for a folder
    of that name) or the path of a folder or archive of images. ``"train"`` yields random crops
    of ``patch_size``, ``"val"`` whole images; ``crop`` overrides that (``crop=False`` to
    evaluate on whole training images).

    ``max_side`` applies to the embedded images only: folders keep their full resolution so
    that results on standard sets stay comparable (use :class:`ImageFolder` directly to shrink
    them). ``epoch_length`` of ``None`` or ``0`` means ``max(images, 64)`` crops per epoch.
    """
    check_split(split)
    if not isinstance(source, str) or not source:
        raise ValueError(f"Invalid data source {source!r}, should be 'embedded' or a path")
    common = dict(patch_size=patch_size, seed=seed, epoch_length=epoch_length, hflip=hflip,
                  crop=crop)
    if source == EMBEDDED:
        return EmbeddedImages(split, max_side=max_side, **common)
    return ImageFolder(source, split, skip_bad=skip_bad, **common)


def describe(dataset: Dataset) -> str:
    """One line for logs: where the images come from, the split, how many, what an item is."""
    if isinstance(dataset, ImageDataset):
        return dataset.describe()
    try:
        size = f"{len(dataset)} items"  # type: ignore[arg-type]
    except TypeError:
        size = "unknown length"
    return f"{type(dataset).__name__}: {size}"
