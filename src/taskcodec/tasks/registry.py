from __future__ import annotations

import inspect

from taskcodec.errors import ConfigError
from taskcodec.registry import Registry
from taskcodec.tasks.base import TaskHead

TASKS: Registry[TaskHead] = Registry("task")

# The arguments every head takes; build_task passes them explicitly.
_COMMON = ("in_channels", "stride", "num_classes")


def build_task(name: str, *, in_channels: int, stride: int = 16, num_classes: int, **kw) -> TaskHead:
    """Build the task head ``name`` (untrained) for a latent of ``in_channels`` channels at ``stride``.

    ``num_classes`` counts what the head predicts: detection includes the background class 0
    (``len(dataset.classes)``), segmentation is ``len(dataset.seg_classes)``, classification
    the number of classes, depth 1. ``kw`` are the head's own options; an unknown one is a
    :class:`ConfigError` that lists the known ones.
    """
    builder = TASKS.get(name)
    options = [p for p in inspect.signature(builder).parameters if p not in _COMMON]
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ConfigError(f'Unknown option "{unknown[0]}" for task {name} (known: {", ".join(options)})')
    return builder(in_channels=in_channels, stride=stride, num_classes=num_classes, **kw)
