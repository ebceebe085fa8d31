import math

import pytest
import torch

from taskcodec.errors import ConfigError
from taskcodec.tasks import (
    IGNORE_INDEX,
    TASKS,
    DepthHead,
    SegmentationHead,
    TaskHead,
    build_task,
    scale_invariant_log_loss,
)

LN2 = math.log(2)
C = 8  # latent channels in these tests
SIZE = (32, 48)  # a 2x3 latent at stride 16


def latent(batch: int = 2, h: int = 2, w: int = 3) -> torch.Tensor:
    return torch.randn(batch, C, h, w, requires_grad=True)


def sample_target(task: str, size=SIZE, with_box: bool = True) -> dict:
    h, w = size
    if task == "detection":
        if not with_box:
            return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        return {"boxes": torch.tensor([[4.0, 6.0, 20.0, 26.0]]), "labels": torch.tensor([2])}
    if task == "segmentation":
        return {"mask": torch.randint(0, 3, (h, w))}
    if task == "depth":
        return {"depth": torch.rand(h, w) + 0.5}
    return {"label": torch.tensor(1)}


def head(task: str, **kw) -> TaskHead:
    num_classes = 1 if task == "depth" else 3
    return build_task(task, in_channels=C, num_classes=num_classes, channels=8, **kw)


LOSS_KEYS = {
    "detection": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss"},
    "segmentation": {"loss_seg", "loss"},
    "depth": {"loss_silog", "loss"},
    "classification": {"loss_classifier", "loss"},
}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors this small gain nothing from threads, and on a busy machine waiting for a second
    # core makes each step ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_lists_the_four_heads():
    assert list(TASKS) == ["classification", "depth", "detection", "segmentation"]


@pytest.mark.parametrize(
    "task, metric, higher",
    [
        ("detection", "map", True),
        ("segmentation", "miou", True),
        ("depth", "abs_rel", False),
        ("classification", "accuracy", True),
    ],
)
def test_metric_names(task, metric, higher):
    model = head(task)
    assert (model.metric_name, model.higher_is_better) == (metric, higher)


@pytest.mark.parametrize("task", sorted(LOSS_KEYS))
def test_training_losses_are_finite_sum_up_and_reach_the_features(task):
    model = head(task).train()
    features = latent()
    out = model(features, SIZE, [sample_target(task), sample_target(task)])
    assert set(out) == LOSS_KEYS[task]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    parts = sum(v for k, v in out.items() if k != "loss")
    assert out["loss"].item() == pytest.approx(parts.item())
    out["loss"].backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "task, shape",
    [("segmentation", (2, 3, 32, 48)), ("depth", (2, 1, 32, 48)), ("classification", (2, 3))],
)
def test_dense_and_class_predictions_have_the_right_shape(task, shape):
    out = head(task).eval()(latent(), SIZE)
    assert isinstance(out, torch.Tensor) and out.shape == shape


def test_depth_predictions_are_positive():
    model = head("depth").eval()
    with torch.no_grad():
        model.regressor[-1].bias.fill_(-30.0)  # exp(-30) is tiny, but still > 0
        assert (model(latent(), SIZE) > 0).all()


def test_detection_predictions_are_torchvision_dicts_clipped_to_the_image():
    model = head("detection").eval()
    with torch.no_grad():
        out = model(latent(h=3, w=3), (40, 44))  # a latent of 48x48 px, the image at its top-left
    assert isinstance(out, list) and len(out) == 2
    for det in out:
        assert set(det) == {"boxes", "labels", "scores"}
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == det["scores"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and ((det["labels"] >= 1) & (det["labels"] <= 2)).all()
    boxes = torch.cat([det["boxes"] for det in out])
    assert len(boxes) > 0  # untrained class scores (~1/3) pass the 0.05 threshold
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 44).all() and (boxes[:, 3] <= 40).all()


def test_detection_without_boxes_has_finite_losses_and_no_box_regression():
    model = head("detection").train()
    features = latent()
    empty = sample_target("detection", with_box=False)
    out = model(features, SIZE, [empty, dict(empty)])
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss_box_reg"].item() == 0 and out["loss_rpn_box_reg"].item() == 0
    assert out["loss_objectness"].item() > 0 and out["loss_classifier"].item() > 0
    out["loss"].backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_detection_batch_mixing_images_with_and_without_boxes():
    out = head("detection").train()(
        latent(), SIZE, [sample_target("detection"), sample_target("detection", with_box=False)]
    )
    assert all(torch.isfinite(v) for v in out.values()) and out["loss_box_reg"].item() > 0


@pytest.mark.parametrize(
    "target, message",
    [
        ({"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1])}, "zero width"),
        ({"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([0])}, "label 0"),
        ({"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([3])}, "label 3"),
        ({"boxes": torch.tensor([1.0, 1.0, 9.0, 9.0]), "labels": torch.tensor([1])}, "should be (n, 4)"),
    ],
)
def test_detection_refuses_targets_that_would_break_training(target, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        head("detection").train()(latent(batch=1), SIZE, [target])


def test_segmentation_cross_entropy_by_hand_with_ignored_pixels():
    model = SegmentationHead(in_channels=C, num_classes=3, channels=8).train()
    with torch.no_grad():
        # Every pixel gets logits (0, ln 2, 0): p = (1/4, 1/2, 1/4), so CE is ln 2 for class 1
        # and ln 4 for classes 0 and 2.
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.tensor([0.0, LN2, 0.0]))
    first = torch.full(SIZE, 1)
    first[:16] = IGNORE_INDEX  # 16 x 48 = 768 pixels of class 1 left
    second = torch.zeros(SIZE, dtype=torch.int64)
    second[:, :8] = IGNORE_INDEX  # 32 x 40 = 1280 pixels of class 0 left
    second[:, 8:12] = 2  # 128 of them class 2 instead
    out = model(latent(), SIZE, [{"mask": first}, {"mask": second}])
    expected = (768 * LN2 + 1280 * 2 * LN2) / (768 + 1280)
    assert out["loss_seg"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_segmentation_with_every_pixel_ignored_is_zero_not_nan():
    model = head("segmentation").train()
    mask = torch.full(SIZE, IGNORE_INDEX)
    out = model(latent(), SIZE, [{"mask": mask}, {"mask": mask}])
    assert out["loss"].item() == 0


def test_segmentation_refuses_unknown_classes_and_single_images():
    model = head("segmentation").train()
    bad = torch.zeros(SIZE, dtype=torch.int64)
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="class 7"):
        model(latent(), SIZE, [{"mask": bad}, {"mask": bad}])
    with pytest.raises(ValueError, match=">= 2 images"):
        model(latent(batch=1), SIZE, [sample_target("segmentation")])


def test_outputs_for_images_not_a_multiple_of_the_stride_are_cropped_not_stretched():
    model = head("segmentation").eval()
    features = latent()
    with torch.no_grad():
        full = model(features, SIZE)
        part = model(features, (20, 37))
    assert part.shape == (2, 3, 20, 37)
    assert torch.equal(part, full[..., :20, :37])


def test_scale_invariant_loss_of_a_scaled_prediction_by_hand():
    target = torch.rand(2, 5, 6) + 0.1
    target[0, 0] = 0  # invalid pixels: their predictions must not count
    log_pred = torch.log(2 * target.clamp(min=0.1))
    log_pred[0, 0] = 17.0
    # d = ln 2 everywhere: mean(d^2) - lambda * mean(d)^2 = (1 - lambda) * ln(2)^2
    assert scale_invariant_log_loss(log_pred, target).item() == pytest.approx(0.5 * LN2**2, rel=1e-5)
    assert scale_invariant_log_loss(log_pred, target, lmbda=1.0).item() == pytest.approx(0, abs=1e-6)
    assert scale_invariant_log_loss(log_pred, target, lmbda=0.0).item() == pytest.approx(LN2**2, rel=1e-5)


def test_scale_invariant_loss_of_one_wrong_pixel_by_hand():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]])
    log_pred = torch.log(torch.tensor([[math.e, 2.0, 3.0, 4.0, 5.0]]))
    # d = (1, 0, 0, 0): 1/4 - 0.5 * (1/4)^2
    assert scale_invariant_log_loss(log_pred, target).item() == pytest.approx(0.21875, rel=1e-6)


def test_scale_invariant_loss_skips_images_without_ground_truth():
    target = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])
    log_pred = torch.full((2, 4, 4), LN2, requires_grad=True)
    loss = scale_invariant_log_loss(log_pred, target)
    assert loss.item() == pytest.approx(0.5 * LN2**2, rel=1e-6)  # the first image's, not halved
    empty = scale_invariant_log_loss(log_pred, torch.zeros(2, 4, 4))
    assert empty.item() == 0
    empty.backward()
    assert torch.equal(log_pred.grad, torch.zeros_like(log_pred))


def test_depth_head_losses_by_hand():
    model = DepthHead(in_channels=C, num_classes=1, channels=8, l1_weight=0.1).train()
    with torch.no_grad():
        model.regressor[-1].weight.zero_()
        model.regressor[-1].bias.fill_(LN2)  # predicts depth 2 everywhere
    first = torch.ones(SIZE)
    first[:8] = 0  # 24 x 48 = 1152 valid pixels, all at depth 1: d = ln 2
    second = torch.ones(SIZE)
    second[:16] = 4.0  # half at 4 (d = -ln 2), half at 1 (d = ln 2): mean d = 0
    out = model(latent(), SIZE, [{"depth": first}, {"depth": second}])
    assert set(out) == {"loss_silog", "loss_l1", "loss"}
    assert out["loss_silog"].item() == pytest.approx((0.5 * LN2**2 + LN2**2) / 2, rel=1e-5)
    # |2 - 1| on 1152 + 768 pixels, |2 - 4| on 768 pixels
    l1 = (1152 + 768 + 2 * 768) / (1152 + 1536)
    assert out["loss_l1"].item() == pytest.approx(0.1 * l1, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_silog"].item() + 0.1 * l1, rel=1e-5)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(latent(), SIZE), torch.full((2, 1, *SIZE), 2.0))


def test_disparity_is_regressed_in_pixels_and_scored_as_rmse_by_hand():
    """The papers' depth target: disparity = 128 * output, loss and score the RMSE in px."""
    from taskcodec.recipes import TaskEvaluator

    model = DepthHead(in_channels=C, num_classes=1, channels=8, target="disparity").train()
    assert model.metric_name == "disparity_rmse" and model.target_keys == ("disparity",)
    with torch.no_grad():
        model.regressor[-1].weight.zero_()
        model.regressor[-1].bias.fill_(0.0625)  # predicts 8 px everywhere
    first = torch.full(SIZE, 5.0)
    first[:8] = 0  # invalid: 24 x 48 = 1152 valid pixels, error 3
    second = torch.full(SIZE, 8.0)
    second[:, :24] = 12.0  # 768 pixels with error 0, 768 with error 4
    out = model(latent(), SIZE, [{"disparity": first}, {"disparity": second}])
    assert set(out) == {"loss_rmse", "loss"}
    rmse = math.sqrt((1152 * 9 + 768 * 16) / (1152 + 1536))  # over the batch's valid pixels
    assert out["loss_rmse"].item() == pytest.approx(rmse, rel=1e-5)
    with pytest.raises(ValueError, match='depth target 0 has no "disparity"'):
        model(latent(), SIZE, [{"depth": first}, {"depth": second}])

    model.eval()
    with torch.no_grad():
        prediction = model(latent(), SIZE)
    assert torch.allclose(prediction, torch.full((2, 1, *SIZE), 8.0))
    evaluator = TaskEvaluator("depth", 1, depth_target="disparity")
    evaluator.add(prediction[:1], [{"disparity": first}])
    evaluator.add(prediction[1:], [{"disparity": second}])
    scores = evaluator.result()   # per image, then the mean over images
    assert set(scores) == {"disparity_abs_rel", "disparity_rmse", "disparity_delta1"}
    assert scores["disparity_rmse"] == pytest.approx((3.0 + math.sqrt(8.0)) / 2, rel=1e-6)


def test_classification_cross_entropy_by_hand():
    model = build_task("classification", in_channels=C, num_classes=2, channels=8).train()
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.tensor([0.0, math.log(3)]))  # p = (1/4, 3/4)
    out = model(latent(), SIZE, [{"label": torch.tensor(0)}, {"label": torch.tensor(1)}])
    assert out["loss_classifier"].item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="label 2 is not in 0..1"):
        model(latent(), SIZE, [{"label": torch.tensor(2)}, {"label": torch.tensor(0)}])


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_a_head_overfits_one_sample(task):
    model = head(task).train()
    features = torch.randn(2, C, 2, 3)
    targets = [sample_target(task), sample_target(task)]
    if task == "segmentation":  # a layout, not per-pixel noise, so that it can be learnt
        mask = torch.zeros(SIZE, dtype=torch.int64)
        mask[:, 16:], mask[8:24, 8:24] = 1, 2
        targets = [{"mask": mask}, {"mask": mask.flip(1)}]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(features, SIZE, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])


def test_training_needs_matching_targets_and_inputs():
    model = head("depth").train()
    with pytest.raises(ValueError, match="needs targets in training mode"):
        model(latent(), SIZE)
    with pytest.raises(ValueError, match="got 1 targets for 2 images"):
        model(latent(), SIZE, [sample_target("depth")])
    with pytest.raises(ValueError, match='target 1 has no "depth" \\(it has: mask\\)'):
        model(latent(), SIZE, [sample_target("depth"), {"mask": torch.zeros(SIZE)}])
    with pytest.raises(ValueError, match=r"expects features of shape \(B, 8, h, w\), got \(2, 4, 2, 3\)"):
        model(torch.randn(2, 4, 2, 3), SIZE, [sample_target("depth")] * 2)


@pytest.mark.parametrize("size", [(16, 48), (33, 48), (32, 49)])
def test_image_size_must_be_the_one_the_latent_was_made_from(size):
    # 16 rows fit in one feature row, so a 2-row latent was not made from them (a padded image's
    # latent with the unpadded size would land here); 33 rows need three.
    with pytest.raises(ValueError, match=f"cover 32x48 pixels, not an image of {size[0]}x{size[1]}"):
        head("classification").eval()(latent(), size)


@pytest.mark.parametrize("size", [(32,), (32.0, 48), (0, 48), "32x48"])
def test_image_size_must_be_two_positive_ints(size):
    with pytest.raises(ValueError, match="Invalid image_size"):
        head("classification").eval()(latent(), size)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("segmentation", {"num_classes": 0}, 'Invalid num_classes "0" for task segmentation, should be >= 1'),
        ("detection", {"num_classes": 1}, 'Invalid num_classes "1" for task detection, should be >= 2'),
        ("depth", {"num_classes": 3}, 'Invalid num_classes "3" for task depth, should be 1'),
        ("depth", {"num_classes": 1, "in_channels": 0}, 'Invalid in_channels "0"'),
        ("segmentation", {"num_classes": 3, "stride": 12, "upsample": 3}, "not divisible by 2\\*\\*3"),
        ("segmentation", {"num_classes": 3, "atrous_rates": []}, 'Invalid atrous_rates "\\[\\]"'),
        ("detection", {"num_classes": 3, "anchor_sizes": [16, 0]}, 'Invalid anchor_sizes "\\[16, 0\\]"'),
        ("detection", {"num_classes": 3, "box_nms_thresh": 2}, 'Invalid box_nms_thresh "2"'),
        ("depth", {"num_classes": 1, "si_lambda": 1.5}, 'Invalid si_lambda "1.5"'),
        ("depth", {"num_classes": 1, "colour": "red"}, 'Unknown option "colour" for task depth \\(known: '),
        ("reconstruction", {"num_classes": 1}, "unknown task 'reconstruction' \\(known: classif"),
    ],
)
def test_build_task_refuses_bad_arguments(name, kwargs, message):
    kwargs = {"in_channels": C, **kwargs}
    with pytest.raises(ConfigError, match=message):
        build_task(name, **kwargs)


def test_build_task_takes_json_style_options():
    model = build_task(
        "detection", in_channels=C, num_classes=3, anchor_sizes=[8, 16], aspect_ratios=[1], upsample=2
    )
    assert model.feature_stride == 4
    assert model.rpn.head.cls_logits.out_channels == 2
