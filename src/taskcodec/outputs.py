"""Writing what a decoder produced: images, and machine-task predictions in common formats.

* reconstruction -> PNG (8-bit RGB)
* detection -> COCO results JSON: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
* segmentation -> PNG of class ids (8-bit, one channel)
* depth -> 16-bit PNG of depth * 256 (0 = no depth), the KITTI convention
* classification -> JSON ``{"label": k, "scores": [...]}``

Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEPTH_SCALE = 256.0


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_image(x: torch.Tensor, path: Path) -> Path:
    """A 1x3xHxW or 3xHxW tensor in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    x = x[0] if x.dim() == 4 else x
    array = x.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return _atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def detections_to_coco(detections: dict[str, torch.Tensor], image_id: int = 0,
                       category_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """torchvision-style detections of one image -> COCO results entries."""
    out = []
    for box, label, score in zip(detections["boxes"].tolist(), detections["labels"].tolist(),
                                 detections["scores"].tolist()):
        x0, y0, x1, y1 = box
        category = category_ids[label] if category_ids else int(label)
        out.append({"image_id": image_id, "category_id": category,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 4)})
    return out


def write_prediction(task: str, prediction: Any, path: Path) -> Path:
    """Write a decoded base layer's task output in the format of its task (see module doc)."""
    from PIL import Image

    if task == "reconstruction":
        return write_image(prediction, path)
    if task == "detection":
        entries = detections_to_coco(prediction[0])
        return _atomic(path, lambda tmp: tmp.write_text(json.dumps(entries, indent=1)))
    if task == "segmentation":
        classes = prediction.argmax(1)[0].to(torch.uint8).cpu().numpy()
        return _atomic(path, lambda tmp: Image.fromarray(classes).save(tmp, format="PNG"))
    if task == "depth":
        depth = prediction[0, 0].clamp(0, 65535 / DEPTH_SCALE).mul(DEPTH_SCALE).round()
        array = depth.cpu().numpy().astype(np.uint16)
        return _atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    if task == "classification":
        scores = torch.softmax(prediction[0], 0).tolist()
        record = {"label": int(np.argmax(scores)), "scores": [round(s, 5) for s in scores]}
        return _atomic(path, lambda tmp: tmp.write_text(json.dumps(record)))
    raise ValueError(f"Invalid task {task!r}")
