"""COCO and Cityscapes loaders on tiny fixture folders in the real layouts, made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taskcodec.data import (
    Cityscapes,
    CocoDetection,
    ScenesDataset,
    build_task_dataset,
    collate,
    describe,
)
from taskcodec.data.cityscapes import BASELINE_M, FOCAL_PX
from taskcodec.errors import ConfigError, DataError
from taskcodec.metrics import detection_map

# -- COCO fixture --------------------------------------------------------------------------------

W, H = 60, 40  # COCO image size (w, h)
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def crowd_rle(h, w, y0, y1, x0, x1):
    """COCO's uncompressed RLE (column-major run lengths) of a filled rectangle."""
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": [h, w]}


def make_coco(root: Path, split: str = "val2017") -> Path:
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    (root / split).mkdir()
    images = []
    for image_id, name in ((42, "000000000042.jpg"), (7, "000000000007.jpg")):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / split / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    annotations = [
        # a person: polygon square 10..30 x 5..25
        {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0, "area": 400.0,
         "bbox": [10.0, 5.0, 20.0, 20.0],
         "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]},
        # a dog sticking out of the right edge: the box is clipped to the image
        {"id": 2, "image_id": 42, "category_id": 18, "iscrowd": 0, "area": 150.0,
         "bbox": [45.0, 20.0, 20.0, 10.0],
         "segmentation": [[45, 20, 60, 20, 60, 30, 45, 30]]},
        # a crowd of cars: no box, ignored in the mask
        {"id": 3, "image_id": 42, "category_id": 3, "iscrowd": 1, "area": 100.0,
         "bbox": [0.0, 30.0, 10.0, 10.0], "segmentation": crowd_rle(H, W, 30, 40, 0, 10)},
    ]  # image 7 has no annotation
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def coco(tmp_path) -> Path:
    return make_coco(tmp_path / "coco")


def test_coco_categories_become_contiguous_labels(coco):
    ds = CocoDetection(coco, "val2017")
    assert ds.classes == ["__background__", "person", "car", "dog"]  # in category-id order
    assert ds.category_to_label == {1: 1, 3: 2, 18: 3}
    assert ds.label_to_category == {1: 1, 2: 3, 3: 18}
    assert ds.seg_classes == ["background", "person", "car", "dog"]


def test_coco_boxes_are_xyxy_clipped_and_crowds_dropped(coco):
    ds = CocoDetection(coco, "val2017")
    assert len(ds) == 2 and ds.ids == [7, 42]  # images without annotations are kept
    image, target = ds[1]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert target["image_id"] == 42 and target["orig_size"] == (H, W)
    assert torch.equal(target["boxes"], torch.tensor([[10.0, 5.0, 30.0, 25.0],
                                                       [45.0, 20.0, 60.0, 30.0]]))
    assert torch.equal(target["labels"], torch.tensor([1, 3]))
    assert "mask" not in target
    _, empty = ds[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert CocoDetection(coco, "val2017", skip_empty=True).ids == [42]


def test_coco_semantic_mask_from_instances(coco):
    _, target = CocoDetection(coco, "val2017", masks=True)[1]
    mask = target["mask"]
    assert mask.shape == (H, W) and mask.dtype == torch.int64
    assert int(mask[15, 20]) == 1  # inside the person polygon
    assert int(mask[25, 50]) == 3  # the dog
    assert int(mask[35, 5]) == 255  # the crowd is ignored
    assert int(mask[2, 2]) == 0
    assert set(mask.unique().tolist()) == {0, 1, 3, 255}


def test_coco_training_crops_are_fixed_size_and_reproducible(coco):
    ds = CocoDetection(coco, "val2017", min_side=32, crop=24, train=True, hflip=True, masks=True)
    image, target = ds[1]
    assert image.shape == (3, 24, 24) and target["mask"].shape == (24, 24)
    assert target["size"] == (24, 24) and target["orig_size"] == (H, W)
    boxes = target["boxes"]
    assert len(boxes) == len(target["labels"])
    assert bool((boxes >= 0).all()) and bool((boxes <= 24).all())
    again = CocoDetection(coco, "val2017", min_side=32, crop=24, train=True, hflip=True, masks=True)
    assert torch.equal(again[1][0], image)
    crops = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        crops.add(ds[1][0].numpy().tobytes())
    assert len(crops) > 1
    images, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 24, 24)


def test_coco_results_map_back_to_category_ids_and_original_pixels(coco):
    ds = CocoDetection(coco, "val2017", min_side=20)  # val: resized, not cropped
    image, target = ds[1]
    assert image.shape == (3, 20, 30) and target["size"] == (20, 30)
    pred = {"boxes": target["boxes"], "labels": target["labels"],
            "scores": torch.tensor([0.9, 0.8])}
    results = ds.to_coco_results([pred], [target])
    assert [r["category_id"] for r in results] == [1, 18]
    assert results[0]["image_id"] == 42
    assert results[0]["bbox"] == pytest.approx([10.0, 5.0, 20.0, 20.0])
    assert detection_map([pred], [target], num_classes=len(ds.classes))["map"] == pytest.approx(1.0)


def test_coco_errors_name_what_is_missing(coco, tmp_path):
    with pytest.raises(DataError, match="COCO folder not found: .*nowhere"):
        CocoDetection(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"instances_train2017\.json"):
        CocoDetection(coco, "train2017")
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(DataError, match=r"COCO image folder not found: .*train2017"):
        CocoDetection(coco, "train2017")
    (coco / "train2017").mkdir()
    with pytest.raises(DataError, match='has no "images" list'):
        CocoDetection(coco, "train2017")
    (coco / "annotations" / "instances_train2017.json").write_text('{"images": [')
    with pytest.raises(DataError, match="is not valid JSON"):
        CocoDetection(coco, "train2017")
    (coco / "val2017" / "000000000042.jpg").unlink()
    ds = CocoDetection(coco, "val2017")
    with pytest.raises(DataError, match=r"COCO image .*000000000042\.jpg is missing"):
        ds[1]


def test_task_factory_finds_coco(coco, monkeypatch):
    ds = build_task_dataset(f"coco:{coco}", "val", task="detection")
    assert isinstance(ds, CocoDetection) and ds.split == "val2017" and not ds.masks
    assert isinstance(build_task_dataset(str(coco), "val", task="segmentation"), CocoDetection)
    assert build_task_dataset(str(coco), "val", task="segmentation").masks
    monkeypatch.setenv("TASKCODEC_COCO", str(coco))
    assert build_task_dataset("coco", "val", task="detection").root == coco
    assert "COCO val2017" in describe(ds)
    with pytest.raises(ConfigError, match="'depth' is not available on coco"):
        build_task_dataset(f"coco:{coco}", "val", task="depth")
    monkeypatch.delenv("TASKCODEC_COCO")
    with pytest.raises(DataError, match=r"\$TASKCODEC_COCO"):
        build_task_dataset("coco", "val", task="detection")


# -- Cityscapes fixture --------------------------------------------------------------------------

CW, CH = 32, 16  # Cityscapes fixture frames (w, h); the real ones are 2048x1024
FRAMES = (("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313"))


def make_cityscapes(root: Path, split: str = "val", *, camera_for_first=True) -> Path:
    rng = np.random.default_rng(1)
    for i, (city, stem) in enumerate(FRAMES):
        paths = {part: root / part / split / city for part in
                 ("leftImg8bit", "gtFine", "disparity", "camera")}
        for path in paths.values():
            path.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (CH, CW, 3), dtype=np.uint8)).save(
            paths["leftImg8bit"] / f"{stem}_leftImg8bit.png")
        ids = np.zeros((CH, CW), dtype=np.uint8)  # unlabeled
        ids[:, 8:16] = 7  # road
        ids[:, 16:24] = 26  # car
        ids[:, 24:28] = 9  # parking: not evaluated
        ids[:, 28:] = 33  # bicycle
        Image.fromarray(ids).save(paths["gtFine"] / f"{stem}_gtFine_labelIds.png")
        raw = np.zeros((CH, CW), dtype=np.uint16)  # 0: invalid
        raw[:, 8:16] = 1  # disparity 0: also invalid
        raw[:, 16:24] = 257  # disparity 1 px
        raw[:, 24:] = 2561  # disparity 10 px
        Image.fromarray(raw).save(paths["disparity"] / f"{stem}_disparity.png")
        if camera_for_first and i == 0:
            camera = {"extrinsic": {"baseline": 0.2, "pitch": 0.05},
                      "intrinsic": {"fx": 2000.0, "fy": 2000.0, "u0": 1000.0, "v0": 500.0}}
            (paths["camera"] / f"{stem}_camera.json").write_text(json.dumps(camera))
    return root


@pytest.fixture
def cityscapes(tmp_path) -> Path:
    return make_cityscapes(tmp_path / "cityscapes")


def test_cityscapes_label_ids_become_train_ids(cityscapes):
    ds = Cityscapes(cityscapes, "val")
    assert len(ds) == 2 and len(ds.seg_classes) == 19
    image, target = ds[0]
    assert image.shape == (3, CH, CW) and target["name"] == "aachen_000000_000019"
    mask = target["mask"]
    assert mask.dtype == torch.int64 and mask.shape == (CH, CW)
    assert int(mask[0, 0]) == 255 and int(mask[0, 10]) == 0 and int(mask[0, 20]) == 13
    assert int(mask[0, 25]) == 255 and int(mask[0, 30]) == 18
    assert ds.seg_classes[13] == "car" and ds.seg_classes[18] == "bicycle"


def test_cityscapes_disparity_becomes_metric_depth(cityscapes):
    ds = Cityscapes(cityscapes, "val")
    depth_with_camera = ds[0][1]["depth"]  # aachen has a camera file: 0.2 m, fx 2000
    assert depth_with_camera.dtype == torch.float32
    assert float(depth_with_camera[0, 0]) == 0.0 and float(depth_with_camera[0, 10]) == 0.0
    assert float(depth_with_camera[0, 20]) == pytest.approx(0.2 * 2000.0)
    assert float(depth_with_camera[0, 30]) == pytest.approx(0.2 * 2000.0 / 10)
    depth_default = ds[1][1]["depth"]  # bochum has none: the usual constants
    assert float(depth_default[0, 20]) == pytest.approx(BASELINE_M * FOCAL_PX, rel=1e-6)
    assert float(depth_default[0, 30]) == pytest.approx(BASELINE_M * FOCAL_PX / 10, rel=1e-6)


def test_cityscapes_and_scenes_also_carry_disparity_in_pixels(cityscapes):
    """The papers' authors regress Cityscapes disparity (px of the full frame), not depth."""
    from taskcodec.data.scenes import BASELINE_FOCAL

    for index in (0, 1):  # with and without a camera file: disparity is the file's, unscaled
        disparity = Cityscapes(cityscapes, "val")[index][1]["disparity"]
        assert disparity.dtype == torch.float32 and disparity.shape == (CH, CW)
        assert disparity[:, :16].eq(0).all()          # raw 0 and raw 1 are invalid
        assert disparity[:, 16:24].eq(1.0).all() and disparity[:, 24:].eq(10.0).all()
    small = Cityscapes(cityscapes, "val", scale=0.5, crop=(4, 6), train=True, hflip=True)[0][1]
    assert small["disparity"].shape == small["depth"].shape == (4, 6)
    assert set(small["disparity"].unique().tolist()) <= {0.0, 1.0, 10.0}
    assert torch.equal(small["disparity"] > 0, small["depth"] > 0)  # moved together

    target = ScenesDataset("val", size=64)[0][1]
    torch.testing.assert_close(target["disparity"] * target["depth"],
                               torch.full((64, 64), BASELINE_FOCAL))


def test_cityscapes_scale_keeps_labels_and_depths_unblended(cityscapes):
    full = Cityscapes(cityscapes, "val")[0][1]
    image, target = Cityscapes(cityscapes, "val", scale=0.5)[0]
    assert image.shape == (3, CH // 2, CW // 2)
    assert target["mask"].shape == (CH // 2, CW // 2)
    assert set(target["mask"].unique().tolist()) <= set(full["mask"].unique().tolist())
    assert set(target["depth"].unique().tolist()) <= set(full["depth"].unique().tolist())
    assert int(target["mask"][0, 5]) == 0 and int(target["mask"][0, 10]) == 13


def test_cityscapes_training_crops_and_targets_subset(cityscapes):
    ds = Cityscapes(cityscapes, "val", targets=("depth",), crop=(8, 12), train=True, hflip=True)
    image, target = ds[1]
    assert image.shape == (3, 8, 12) and target["depth"].shape == (8, 12)
    assert "mask" not in target
    images, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 8, 12)


def test_cityscapes_errors_name_what_is_missing(cityscapes, tmp_path):
    with pytest.raises(DataError, match=r"Cityscapes folder not found: .*leftImg8bit/train"):
        Cityscapes(cityscapes, "train")
    (cityscapes / "gtFine" / "val" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=r"gtFine file not found: .*bochum_000000_000313_gtFine"):
        Cityscapes(cityscapes, "val")
    assert len(Cityscapes(cityscapes, "val", targets=("depth",))) == 2  # labels not needed
    no_disparity = make_cityscapes(tmp_path / "other")
    for path in sorted((no_disparity / "disparity").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (no_disparity / "disparity").rmdir()
    with pytest.raises(DataError, match=r"Cityscapes folder not found: .*disparity/val"):
        Cityscapes(no_disparity, "val")
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="no .*_leftImg8bit.png images in"):
        Cityscapes(empty, "val", targets=())
    with pytest.raises(ValueError, match="scale"):
        Cityscapes(cityscapes, "val", scale=2)


def test_task_factory_finds_cityscapes(cityscapes, monkeypatch, tmp_path):
    ds = build_task_dataset(f"cityscapes:{cityscapes}", "val", task="depth")
    assert isinstance(ds, Cityscapes) and ds.targets == ("depth",)
    both = build_task_dataset(str(cityscapes), "val", task=("segmentation", "depth"), scale=0.5)
    assert both.targets == ("mask", "depth") and both.scale == 0.5
    monkeypatch.setenv("TASKCODEC_CITYSCAPES", str(cityscapes))
    assert build_task_dataset("cityscapes", "val", task="segmentation").root == cityscapes
    with pytest.raises(ConfigError, match="'detection' is not available on cityscapes"):
        build_task_dataset("cityscapes", "val", task="detection")
    (tmp_path / "mystery").mkdir()
    with pytest.raises(DataError, match="cannot tell which data set"):
        build_task_dataset(str(tmp_path / "mystery"), "val", task="segmentation")
    with pytest.raises(DataError, match="data folder not found"):
        build_task_dataset(str(tmp_path / "absent"), "val", task="segmentation")
