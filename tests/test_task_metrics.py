"""Task metrics against hand-computed values: COCO mAP, mIoU / pixel accuracy, depth errors."""

from __future__ import annotations

import math

import pytest
import torch

from taskcodec.metrics import ConfusionMatrix, depth_errors, detection_map, segmentation_scores

# -- detection ---------------------------------------------------------------------------------

GT = [
    {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 100.0]]),
     "labels": torch.tensor([1, 2])},
    {"boxes": torch.tensor([[0.0, 0.0, 20.0, 30.0]]), "labels": torch.tensor([1])},
]


def detections(boxes_per_image, labels_per_image, scores_per_image=None):
    out = []
    for i, (boxes, labels) in enumerate(zip(boxes_per_image, labels_per_image)):
        scores = (scores_per_image[i] if scores_per_image
                  else [0.9 - 0.1 * k for k in range(len(labels))])
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "scores": torch.tensor(scores, dtype=torch.float32)})
    return out


def perfect():
    return detections([t["boxes"].tolist() for t in GT], [t["labels"].tolist() for t in GT])


def test_perfect_detections_score_one():
    result = detection_map(perfect(), GT, num_classes=3)
    assert result["map"] == pytest.approx(1.0)
    assert result["map50"] == pytest.approx(1.0)


def test_shifted_box_loses_the_strict_thresholds_only():
    # The first class-1 box moves 4 px right: IoU = 36*40 / (44*40) = 0.818, a match at
    # IoU 0.50..0.80 (7 of the 10 thresholds), a miss at 0.85..0.95. At those 3 strict
    # thresholds class 1 ranks the shifted box (score .9, a false positive) before the true
    # one of image 2 (score .7): precision 1/2 at recall 1/2, so COCO's 101-point
    # interpolated precision is 1/2 at recalls 0, .01, ..., .5 (51 points) and 0 above:
    # AP = 51 / 202. Class 2 stays perfect.
    preds = detections([t["boxes"].tolist() for t in GT], [[1, 2], [1]], [[0.9, 0.8], [0.7]])
    preds[0]["boxes"][0] += torch.tensor([4.0, 0.0, 4.0, 0.0])
    result = detection_map(preds, GT, num_classes=3)
    ap_class1 = (7 * 1.0 + 3 * 51 / 202) / 10
    assert result["map"] == pytest.approx((ap_class1 + 1.0) / 2)
    assert result["map50"] == pytest.approx(1.0)


def test_shift_on_a_single_box_matches_hand_count():
    # One image, one box per class; class 1 shifted 4 px: AP_1 = 7/10, AP_2 = 1 -> 0.85.
    gt = [GT[0]]
    preds = detections([GT[0]["boxes"].tolist()], [[1, 2]])
    preds[0]["boxes"][0] += torch.tensor([4.0, 0.0, 4.0, 0.0])
    result = detection_map(preds, gt, num_classes=3)
    assert result["map"] == pytest.approx(0.85)
    assert result["map50"] == pytest.approx(1.0)


def test_wrong_label_and_far_boxes_score_zero():
    wrong_label = detections([t["boxes"].tolist() for t in GT], [[2, 1], [2]])
    far = detections([[[200.0, 200.0, 220.0, 220.0]] * 2, [[200.0, 200.0, 220.0, 220.0]]],
                     [[1, 2], [1]])
    assert detection_map(wrong_label, GT, 3)["map"] == pytest.approx(0.0)
    assert detection_map(far, GT, 3)["map50"] == pytest.approx(0.0)


def test_no_predictions_score_zero_and_no_ground_truth_is_nan():
    empty = detections([[], []], [[], []], [[], []])
    assert detection_map(empty, GT, 3) == {"map": 0.0, "map50": 0.0}
    no_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    with pytest.warns(UserWarning, match="no box"):
        result = detection_map(perfect(), no_gt, 3)
    assert math.isnan(result["map"]) and math.isnan(result["map50"])


def test_detection_map_refuses_bad_input():
    with pytest.raises(ValueError, match="one per image"):
        detection_map(perfect()[:1], GT, 3)
    with pytest.raises(ValueError, match="label 2, should be in 1..1"):
        detection_map(perfect(), GT, 2)  # num_classes counts the background
    bad = perfect()
    bad[0]["scores"] = bad[0]["scores"][:1]
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        detection_map(bad, GT, 3)


def test_detection_map_prints_nothing(capsys):
    detection_map(perfect(), GT, 3)
    assert capsys.readouterr().out == ""


# -- segmentation ------------------------------------------------------------------------------

def test_segmentation_scores_by_hand_with_ignore():
    target = torch.tensor([[[0, 0, 1, 1],
                            [0, 2, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1],
                          [0, 2, 2, 0]]])
    # Valid pixels: 7 (one ignored, whatever its prediction). Correct: 0,0 / 0,2 / 0,3 /
    # 1,0 / 1,1 -> 5/7. Class 0: tp 2, target 3, pred 2 -> 2/3. Class 1: tp 2, target 3,
    # pred 3 -> 2/4. Class 2: tp 1, target 1, pred 2 -> 1/2.
    scores = segmentation_scores(pred, target, num_classes=4)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    assert scores["miou"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)  # class 3 absent


def test_absent_class_in_prediction_only_counts_as_zero():
    target = torch.zeros(1, 2, 2, dtype=torch.int64)
    pred = torch.tensor([[[0, 0], [0, 3]]])
    scores = segmentation_scores(pred, target, num_classes=4)
    assert scores["miou"] == pytest.approx((3 / 4 + 0.0) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 4)


def test_confusion_matrix_accumulates_like_one_big_batch():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, 0, :4] = 255
    pred = torch.randint(0, 3, (4, 8, 8), generator=g)
    matrix = ConfusionMatrix(3)
    for i in range(4):
        matrix.update(pred[i:i + 1], target[i:i + 1])
    assert matrix.compute() == pytest.approx(segmentation_scores(pred, target, 3))
    assert int(matrix.matrix.sum()) == 4 * 64 - 4
    matrix.reset()
    assert math.isnan(matrix.compute()["miou"])


def test_segmentation_refuses_bad_maps():
    ok = torch.zeros(1, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="class 7"):
        segmentation_scores(ok, ok + 7, num_classes=3)
    with pytest.raises(ValueError, match="argmax"):
        segmentation_scores(ok.float(), ok, num_classes=3)
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_scores(ok, ok[..., :1], num_classes=3)


# -- depth -------------------------------------------------------------------------------------

def test_depth_errors_by_hand_over_valid_pixels():
    target = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
    pred = torch.tensor([[[[1.0, 3.0], [2.0, 9.0]]]])  # [B, 1, H, W]; 9.0 lies on an invalid pixel
    # |p-t|/t: 0, 0.5, 0.5 -> 1/3. Squared errors 0, 1, 4 -> rmse sqrt(5/3).
    # Ratios 1, 1.5, 2 -> only the first is below 1.25.
    errors = depth_errors(pred, target)
    assert errors["abs_rel"] == pytest.approx(1 / 3)
    assert errors["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert errors["delta1"] == pytest.approx(1 / 3)


def test_depth_errors_perfect_and_empty():
    target = torch.tensor([[2.0, 5.0]])
    assert depth_errors(target.clone(), target) == {"abs_rel": 0.0, "rmse": 0.0, "delta1": 1.0}
    with pytest.warns(UserWarning, match="no valid pixel"):
        errors = depth_errors(target, torch.zeros_like(target))
    assert all(math.isnan(v) for v in errors.values())
    with pytest.raises(ValueError, match="shapes differ"):
        depth_errors(torch.zeros(1, 3), target)
