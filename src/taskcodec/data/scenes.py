"""Procedural "scenes": the embedded multi-task data set (no download, any number of images).

Each image is a textured background (a colour gradient, soft stripes or smooth noise, in
muted colours) with 1 to 4 flat-shaded shapes of five classes drawn far-to-near (painter's
algorithm), so nearer shapes occlude farther ones. Every class has its own saturated colour
family (disc red, square green, triangle blue, ring yellow, cross magenta) and the
background never is saturated, so a class is recognisable from colour and outline even
through a tiny codec latent.

Depth is metric-like: the background is a tilted plane 7-20 m away (nearer at the bottom,
like a floor seen from above), each shape a plane at its own depth of 2-6 m. A shape's size
is inversely proportional to its depth and far shapes fade slightly into haze, so a
monocular depth head has the same cues it has in photographs.

One item, as every issue-4 data set yields it (see ``/tmp/spec/scalable.md``)::

    image  float32 (3, H, W) in [0, 1], quantised to 8 bits
    target {"boxes":  float32 (n, 4) xyxy of the *visible* pixels (x1, y1 exclusive),
            "labels": int64 (n,) in 1..5 (index into ``classes``),
            "mask":   int64 (H, W): 0 background, k for class k (same numbering as labels),
            "depth":  float32 (H, W) in metres, > 0 everywhere,
            "disparity": float32 (H, W) in pixels, BASELINE_FOCAL / depth,
            "label":  int64 () class of the shape with most visible pixels (1..5),
            "image_id": int (the index)}

Decisions: shapes less than 30 % visible (or with fewer than 16 visible pixels) get no box,
but their visible pixels keep their class in the mask and their depth - they are really
there. Edges are hard (no anti-aliasing), so the mask never needs the ignore label 255.
Box, mask and classification labels share one numbering, so ``len(classes)`` is the
``num_classes`` of every head (class 0 never is a classification label).

Item ``index`` of a split is a pure function of ``(seed, split, index)``: the generator is
seeded with ``[seed, stream(split), index]``, so train and val come from different streams
and any worker, in any order, draws the same image.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from taskcodec.data.base import ImageDataset, check_split
from taskcodec.data.transforms import parse_patch_size

SHAPES = ("disc", "square", "triangle", "ring", "cross")
CLASSES = ("__background__", *SHAPES)
SEG_CLASSES = ("background", *SHAPES)
_HUES = (0.0, 0.33, 0.62, 0.15, 0.83)  # HSV hue of each shape's colour family
_STREAMS = {"train": 0, "val": 1}  # seed-sequence word that keeps the splits apart

DEFAULT_SIZE = 128
DEFAULT_LENGTH = {"train": 2048, "val": 128}
MIN_SIZE = 32
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 16
NEAR, FAR = 2.0, 6.0  # depth range of the shapes (m); the background is always farther
#: Stereo baseline (m) times focal length (px) of an imagined rig: disparity = this / depth, so
#: the scenes can train and test disparity regression (about 6-32 px) as well as depth.
BASELINE_FOCAL = 64.0
_HAZE = (0.78, 0.8, 0.82)


@dataclass(frozen=True)
class SceneObject:
    """One shape: its class (index into :data:`SHAPES`), centre, radius and angle in pixels
    and radians, and depth in metres."""

    shape: int
    cy: float
    cx: float
    radius: float
    angle: float
    depth: float

    def window(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: a part of the frame that holds the whole shape."""
        reach = int(math.ceil(1.25 * self.radius)) + 1  # the farthest corner is at 1.2 radii
        return (max(0, int(self.cy) - reach), min(h, int(self.cy) + reach + 1),
                max(0, int(self.cx) - reach), min(w, int(self.cx) + reach + 1))

    def inside(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Which pixels of rows ``y0:y1`` and columns ``x0:x1`` the shape covers (bool)."""
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = (gy - self.cy) / self.radius, (gx - self.cx) / self.radius
        c, s = math.cos(self.angle), math.sin(self.angle)
        return _inside(self.shape, c * dx + s * dy, -s * dx + c * dy)


@dataclass(frozen=True)
class Scene:
    """One rendered scene as numpy arrays (see the module docstring for the meanings).

    ``objects`` are in drawing order (far to near); ``instances`` tells which of them is
    seen at each pixel (-1: background); ``kept[i]`` is the object of box ``i``.
    """

    image: np.ndarray  # uint8 (H, W, 3)
    boxes: np.ndarray  # float32 (n, 4) xyxy
    labels: np.ndarray  # int64 (n,)
    mask: np.ndarray  # int64 (H, W)
    depth: np.ndarray  # float32 (H, W)
    label: int
    objects: tuple[SceneObject, ...]
    instances: np.ndarray  # int64 (H, W)
    kept: tuple[int, ...]


def render_scene(size: tuple[int, int], rng: np.random.Generator,
                 max_objects: int = 4) -> Scene:
    """Draw one scene of ``size`` ``(h, w)`` from ``rng`` (consumes it; pure otherwise)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= max(h - 1, 1)
    xx /= max(w - 1, 1)
    image = _background(yy, xx, rng)
    # A floor-like plane: near at the bottom row, far at the top, slightly tilted sideways.
    bottom, top, tilt = rng.uniform(7.0, 9.0), rng.uniform(12.0, 20.0), rng.uniform(-1.5, 1.5)
    depth = (top + (bottom - top) * yy + tilt * (xx - 0.5)).astype(np.float32)
    owner = np.full((h, w), -1, dtype=np.int64)  # index of the shape seen at each pixel

    n = int(rng.integers(1, max_objects + 1))
    depths = np.sort(rng.uniform(NEAR, FAR, n))[::-1]  # far first: painter's algorithm
    side = min(h, w)
    objects = tuple(
        SceneObject(shape=int(rng.integers(0, len(SHAPES))),
                    cy=rng.uniform(0.1, 0.9) * (h - 1), cx=rng.uniform(0.1, 0.9) * (w - 1),
                    radius=side * rng.uniform(0.09, 0.13) * 4.0 / z,  # size ~ 1 / depth
                    angle=rng.uniform(0.0, 2 * math.pi), depth=float(z))
        for z in depths)
    drawn = np.zeros(n, dtype=np.int64)  # pixels of each shape inside the frame
    for k, obj in enumerate(objects):
        colour = _shape_colour(obj.shape, obj.depth, rng)
        light = rng.uniform(-0.15, 0.15, 2) / obj.radius  # a little relief, not a sticker
        y0, y1, x0, x1 = obj.window(h, w)
        inside = obj.inside(y0, y1, x0, x1)
        drawn[k] = inside.sum()
        gy, gx = np.nonzero(inside)
        shade = 1.0 + light[0] * (gx + x0 - obj.cx) + light[1] * (gy + y0 - obj.cy)
        image[y0:y1, x0:x1][inside] = np.clip(colour[None, :] * shade[:, None], 0.0, 1.0)
        owner[y0:y1, x0:x1][inside] = k
        depth[y0:y1, x0:x1][inside] = obj.depth

    image += np.float32(0.012) * rng.standard_normal(image.shape, dtype=np.float32)
    image8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    classes = np.asarray([obj.shape + 1 for obj in objects], dtype=np.int64)
    mask = np.concatenate([[0], classes])[owner + 1]
    visible = np.bincount(owner.ravel() + 1, minlength=n + 1)[1:]
    boxes, kept = [], []
    for k in range(n):
        if visible[k] < MIN_VISIBLE_PIXELS or visible[k] < MIN_VISIBLE_FRACTION * drawn[k]:
            continue
        rows = np.flatnonzero((owner == k).any(axis=1))
        cols = np.flatnonzero((owner == k).any(axis=0))
        boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
        kept.append(k)
    largest = int(np.argmax(visible))  # boxed or not: tiny images may have no box at all
    return Scene(
        image=image8,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=classes[kept],
        mask=mask,
        depth=depth,
        label=int(classes[largest]),
        objects=objects,
        instances=owner,
        kept=tuple(kept),
    )


def _background(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A muted two-colour texture: a gradient, soft stripes or smooth noise; float (H, W, 3)."""
    kind = int(rng.integers(0, 3))
    theta = rng.uniform(0.0, 2 * math.pi)
    along = math.cos(theta) * xx + math.sin(theta) * yy
    if kind == 0:
        t = along - along.min()
        t /= max(float(t.max()), 1e-6)
    elif kind == 1:
        t = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(2.0, 6.0) * along + rng.uniform(0, 6.3))
    else:  # a few low-frequency waves in random directions
        t = np.zeros_like(xx)
        for _ in range(3):
            a = rng.uniform(0.0, 2 * math.pi)
            f = rng.uniform(0.5, 2.5)
            t += np.sin(2 * math.pi * f * (math.cos(a) * xx + math.sin(a) * yy) + rng.uniform(0, 6.3))
        t = (t + 3.0) / 6.0
    first, second = _muted(rng), _muted(rng)
    return (first * (1.0 - t[..., None]) + second * t[..., None]).astype(np.float32)


def _muted(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.8)
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _shape_colour(cls: int, depth: float, rng: np.random.Generator) -> np.ndarray:
    hue = (_HUES[cls] + rng.uniform(-0.03, 0.03)) % 1.0
    rgb = np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0)),
                     dtype=np.float32)
    haze = 0.25 * (depth - NEAR) / (FAR - NEAR)
    return rgb * (1.0 - haze) + np.asarray(_HAZE, dtype=np.float32) * haze


def _inside(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points ``(u, v)`` of a shape's own frame (unit radius) shape ``cls`` covers."""
    shape = SHAPES[cls]
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":  # equilateral, circumradius 1.15: inside all three edges
        r = 0.575  # inradius
        return ((v <= r) & (0.866 * u - 0.5 * v <= r) & (-0.866 * u - 0.5 * v <= r))
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.3)
    au, av = np.abs(u), np.abs(v)  # cross: two bars
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name} {value!r}, should be an int >= {minimum}")
    return value


def _parse_size(size) -> tuple[int, int]:
    h, w = parse_patch_size(size)
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"Invalid scene size {size!r}, sides should be >= {MIN_SIZE}")
    return h, w


class ScenesDataset(Dataset):
    """Procedural multi-task scenes: ``(image, target)`` items (see the module docstring).

    Args:
        split: ``"train"`` or ``"val"`` (disjoint random streams).
        size: image size, an int or ``(h, w)``; 128 by default.
        length: number of items; 2048 for train and 128 for val by default.
        seed: seeds the whole split (non-negative int).
        max_objects: at most this many shapes per image (at least one).
    """

    classes = list(CLASSES)
    seg_classes = list(SEG_CLASSES)
    ignore_index = 255

    def __init__(self, split: str = "train", *, size: int | tuple[int, int] = DEFAULT_SIZE,
                 length: int | None = None, seed: int = 0, max_objects: int = 4) -> None:
        self.split = check_split(split)
        self.size = _parse_size(size)
        self.length = _check_positive_int("length", DEFAULT_LENGTH[split] if length is None
                                          else length)
        self.seed = _check_positive_int("seed", seed, minimum=0)
        self.max_objects = _check_positive_int("max_objects", max_objects)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """Item ``index`` as numpy arrays."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        index %= self.length
        rng = np.random.default_rng([self.seed, _STREAMS[self.split], index])
        return render_scene(self.size, rng, self.max_objects)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        scene = self.scene(index)
        # numpy does the HWC->CHW float conversion ~20x faster than torch's strided copy
        chw = np.ascontiguousarray(scene.image.transpose(2, 0, 1), dtype=np.float32)
        image = torch.from_numpy(chw / np.float32(255.0))
        target = {
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.from_numpy(scene.labels),
            "mask": torch.from_numpy(scene.mask),
            "depth": torch.from_numpy(scene.depth),
            "disparity": torch.from_numpy(BASELINE_FOCAL / scene.depth),
            "label": torch.tensor(scene.label, dtype=torch.int64),
            "image_id": index % self.length,
        }
        return image, target

    def describe(self) -> str:
        h, w = self.size
        return (f"scenes [{self.split}]: {self.length} procedural {w}x{h} images, "
                f"1-{self.max_objects} of {len(SHAPES)} shape classes (seed {self.seed})")


class SceneImages(ImageDataset):
    """The scenes' images alone, for plain codecs (``build_dataset("scenes", ...)``).

    Each scene is rendered at the crop size when training (so the "crop" is the whole
    scene, plus an optional flip) and at ``patch_size`` for validation too: procedural
    scenes have no native size. ``data_seed`` seeds the scenes, ``seed`` the flips.
    ``epoch_length`` is also the number of distinct scenes.
    """

    def __init__(self, split: str = "train", *, patch_size: int | tuple[int, int] = 256,
                 seed: int = 0, epoch_length: int | None = None, hflip: bool = False,
                 crop: bool | None = None, data_seed: int = 0) -> None:
        check_split(split)
        count = epoch_length or (DEFAULT_LENGTH["train"] if split == "train" else 16)
        super().__init__([f"scene{i}" for i in range(count)], source="scenes", split=split,
                         crop=split == "train" if crop is None else crop,
                         patch_size=patch_size, seed=seed, epoch_length=epoch_length,
                         hflip=hflip)
        self._scenes = ScenesDataset(split, size=_parse_size(patch_size), length=count,
                                     seed=data_seed)  # the scenes; ``seed``: flips

    def _load(self, i: int) -> tuple[torch.Tensor, None]:
        image = self._scenes.scene(i).image
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), None
