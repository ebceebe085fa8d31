"""From a config's ``data`` string to a data set, and a line to log about it.

:func:`build_dataset` gives images alone, for codecs; :func:`build_task_dataset` gives
``(image, target)`` items for task networks (batch them with
:func:`taskcodec.data.samples.collate`).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from taskcodec.data.base import FOLDER_SPLITS, ImageDataset, check_plain_split, check_split
from taskcodec.data.cityscapes import Cityscapes, check_scale
from taskcodec.data.coco import CocoDetection
from taskcodec.data.embedded import DEFAULT_MAX_SIDE, EmbeddedImages
from taskcodec.data.folder import ImageFolder
from taskcodec.data.scenes import DEFAULT_SIZE, SceneImages, ScenesDataset
from taskcodec.errors import ConfigError, DataError

EMBEDDED = "embedded"
SCENES = "scenes"
TASKS = ("detection", "segmentation", "depth", "classification", "reconstruction")
#: What each multi-task source can supervise ("reconstruction" needs only the images).
SUPPORTED_TASKS = {
    "scenes": TASKS,
    "coco": ("detection", "segmentation", "reconstruction"),
    "cityscapes": ("segmentation", "depth", "reconstruction"),
}
#: Environment variables that name the local copy when the source is just "coco"/"cityscapes".
ROOT_VARIABLES = {"coco": "TASKCODEC_COCO", "cityscapes": "TASKCODEC_CITYSCAPES"}
DEFAULT_COCO_CROP = 512
MAX_CITYSCAPES_CROP = 512


def build_dataset(
    source: str,
    split: str,
    *,
    patch_size: int | tuple[int, int] = 256,
    seed: int = 0,
    data_seed: int = 0,
    max_side: int | None = DEFAULT_MAX_SIDE,
    skip_bad: bool = False,
    epoch_length: int | None = None,
    hflip: bool = False,
    crop: bool | None = None,
    cache_mb: int = 0,
) -> Dataset:
    """The ``split`` (``"train"`` or ``"val"``; for folders also ``"test"``, ``"all"``,
    ``"auto"``: see :class:`ImageFolder`) of ``source``.

    ``source`` is ``"embedded"`` (scikit-image's photographs; write ``./embedded`` for a folder
    of that name), ``"scenes"`` (the procedural scenes' images, rendered at ``patch_size``;
    ``epoch_length`` is also their number) or the path of a folder or archive of images.
    ``"train"`` yields random crops of ``patch_size``, ``"val"`` whole images; ``crop``
    overrides that (``crop=False`` to evaluate on whole training images).

    ``max_side`` applies to the embedded images only: folders keep their full resolution so
    that results on standard sets stay comparable (use :class:`ImageFolder` directly to shrink
    them); ``seed`` seeds the crops and flips, ``data_seed`` the scenes themselves;
    ``cache_mb`` keeps that many megabytes of a folder's decoded images in memory
    (embedded images are always kept). ``epoch_length`` of ``None`` or ``0`` means ``max(images, 64)`` crops per epoch.
    """
    check_split(split, (*FOLDER_SPLITS, "auto"))
    if not isinstance(source, str) or not source:
        raise ValueError(f"Invalid data source {source!r}, should be 'embedded' or a path")
    common = dict(patch_size=patch_size, seed=seed, epoch_length=epoch_length, hflip=hflip,
                  crop=crop)
    if source in (EMBEDDED, SCENES):
        split = check_plain_split("val" if split == "auto" else split, source)
        return (EmbeddedImages(split, max_side=max_side, **common) if source == EMBEDDED
                else SceneImages(split, data_seed=data_seed, **common))
    return ImageFolder(source, split, skip_bad=skip_bad, cache_mb=cache_mb, **common)


def build_task_dataset(
    source: str,
    split: str,
    *,
    task: str | tuple[str, ...] | list[str],
    size: int | tuple[int, int] | None = None,
    seed: int = 0,
    data_seed: int = 0,
    **kw,
) -> Dataset:
    """The ``split`` (``"train"`` or ``"val"``) of a multi-task data set, for ``task``.

    ``source`` is ``"scenes"`` (procedural, embedded), ``"coco:PATH"``, ``"cityscapes:PATH"``,
    ``"coco"``/``"cityscapes"`` (path from ``$TASKCODEC_COCO``/``$TASKCODEC_CITYSCAPES``) or
    a bare path recognised by its layout (``annotations/instances_*.json``: COCO;
    ``leftImg8bit/``: Cityscapes). ``task`` is one task or several (for example the base
    task and an assisted one); a source that cannot supervise one is a :class:`ConfigError`.

    ``size`` is the image size of the scenes (default 128), and the training crop of COCO
    (default 512, after resizing the shorter side to it) and Cityscapes (default 512, at
    most the scaled height); validation items of COCO and Cityscapes are whole images.
    Other keywords go to the data set: scenes ``length``, ``max_objects``; COCO
    ``min_side``, ``hflip``, ``skip_empty`` (default: for training), ``ann_file``;
    Cityscapes ``scale`` (default 1), ``hflip``. ``seed`` seeds the training crops and
    flips of COCO and Cityscapes, ``data_seed`` the procedural scenes.
    """
    check_split(split)
    tasks = (task,) if isinstance(task, str) else tuple(task)
    if not tasks or any(t not in TASKS for t in tasks):
        raise ConfigError(f"Invalid task {task!r}, should be one or more of {', '.join(TASKS)}")
    kind, root = resolve_task_source(source)
    unsupported = [t for t in tasks if t not in SUPPORTED_TASKS[kind]]
    if unsupported:
        raise ConfigError(f"task {unsupported[0]!r} is not available on {kind} (available: "
                          f"{', '.join(SUPPORTED_TASKS[kind])})")
    train = split == "train"
    if kind == "scenes":
        _check_options(kind, kw, ("length", "max_objects"))
        return ScenesDataset(split, size=DEFAULT_SIZE if size is None else size,
                             seed=data_seed, **kw)
    if kind == "coco":
        _check_options(kind, kw, ("min_side", "hflip", "skip_empty", "ann_file"))
        crop = (size or DEFAULT_COCO_CROP) if train else None
        if train and "min_side" not in kw:
            kw["min_side"] = max(crop) if isinstance(crop, (tuple, list)) else crop
        kw.setdefault("skip_empty", train)
        return CocoDetection(root, f"{split}2017", masks="segmentation" in tasks, crop=crop,
                             train=train, seed=seed, **kw)
    _check_options(kind, kw, ("scale", "hflip"))
    scale = check_scale(kw.pop("scale", 1.0))
    crop = None
    if train:
        side = min(MAX_CITYSCAPES_CROP, max(16, round(1024 * scale)))
        crop = size or side
    targets = tuple(t for t, name in (("mask", "segmentation"), ("depth", "depth"))
                    if name in tasks)
    return Cityscapes(root, split, targets=targets, scale=scale, crop=crop, train=train,
                      seed=seed, **kw)


def resolve_task_source(source: str) -> tuple[str, Path | None]:
    """``(kind, root)`` of a multi-task source string: kind is scenes, coco or cityscapes."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"Invalid data source {source!r}, should be 'scenes', 'coco:PATH', "
                         "'cityscapes:PATH' or a path")
    if source == SCENES:
        return "scenes", None
    kind, sep, rest = source.partition(":")
    if sep and kind in ROOT_VARIABLES:
        if not rest:
            raise ValueError(f"Invalid data source {source!r}: no path after '{kind}:'")
        return kind, Path(rest).expanduser()
    if source in ROOT_VARIABLES:
        variable = ROOT_VARIABLES[source]
        value = os.environ.get(variable, "")
        if not value:
            raise DataError(f"data source {source!r} needs ${variable} (the local copy's "
                            f"folder), or write '{source}:PATH'")
        return source, Path(value).expanduser()
    path = Path(source).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder not found: {path}")
    if any((path / "annotations").glob("instances_*.json")):
        return "coco", path
    if (path / "leftImg8bit").is_dir():
        return "cityscapes", path
    raise DataError(f"cannot tell which data set {path} holds: expected "
                    "annotations/instances_*.json (COCO) or leftImg8bit/ (Cityscapes)")


def _check_options(kind: str, kw: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for {kind} data (known: "
                          f"{', '.join(known)})")


def describe(dataset: Dataset) -> str:
    """One line for logs: where the images come from, the split, how many, what an item is."""
    if isinstance(dataset, ImageDataset) or callable(getattr(dataset, "describe", None)):
        return dataset.describe()
    try:
        size = f"{len(dataset)} items"  # type: ignore[arg-type]
    except TypeError:
        size = "unknown length"
    return f"{type(dataset).__name__}: {size}"
