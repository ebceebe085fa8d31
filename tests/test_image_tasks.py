"""Image-space task networks (issue 13): the base latent decoded to an image-like tensor, then a
full torchvision network, as in the papers' authors' code.

Every network trains one step on CPU, codes a real layered bitstream whose base layer decodes
alone to the task output of the forward pass, and starts from weights in a file (never a
download). The networks are big: 64 px scenes, batches of one or two, one step, torchvision's
RoI sampling reduced for the detector; all builds happen in this one process.
"""

from __future__ import annotations

import pytest
import torch

from taskcodec.codecs.scalable import BaseModel
from taskcodec.config import BaseConfig, EvalConfig
from taskcodec.data import ScenesDataset
from taskcodec.errors import ConfigError
from taskcodec.tasks.image import ImageTaskNetwork, hub_checkpoints, resolve_weights
from test_scalable import (
    DET_CLASSES,
    SEG_CLASSES,
    assert_same_prediction,
    codec_for,
    layers_of,
    scene,
    without_enhancement,
)

SIZE = 64
#: (task, network, depth target); each network once, depth as the authors' disparity.
NETWORKS = [("detection", "fasterrcnn_resnet50_fpn_v2", "depth"),
            ("depth", "lraspp_mobilenet_v3_large", "disparity"),
            ("segmentation", "deeplabv3_mobilenet_v3_large", "depth"),
            ("segmentation", "deeplabv3_resnet50", "depth")]
#: The detector's RoI sampling, reduced from torchvision's 2000/1000/512 for CPU tests.
SMALL_DETECTOR = {"rpn_post_nms_top_n_train": 64, "rpn_post_nms_top_n_test": 32,
                  "box_batch_size_per_image": 32}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def classes(task: str) -> int:
    return {"detection": DET_CLASSES, "segmentation": SEG_CLASSES}.get(task, 1)


def base_args(task: str, network: str, depth_target: str = "depth") -> dict:
    return {"kind": "base", "N": 8, "M": 8, "task": task, "entropy_model": "factorized",
            "num_classes": classes(task), "synthesis_head": False, "task_network": network,
            "synthesis_width": 8, "probe": True, "depth_target": depth_target,
            "detection_min_size": 0,
            "task_kwargs": SMALL_DETECTOR if task == "detection" else None}


def build_base(task: str, network: str, depth_target: str = "depth") -> BaseModel:
    from taskcodec.recipes import BaseRecipe

    torch.manual_seed(0)
    return BaseRecipe.build_model(base_args(task, network, depth_target))


def batch(size: int) -> tuple[torch.Tensor, list[dict]]:
    items = [ScenesDataset("train", size=SIZE)[i] for i in range(size)]
    return torch.stack([image for image, _ in items]), [target for _, target in items]


@pytest.mark.parametrize(("task", "network", "depth_target"), NETWORKS)
def test_each_network_trains_a_step_through_the_synthesis_into_the_encoder(
        task, network, depth_target):
    model = build_base(task, network, depth_target).train()
    assert isinstance(model.task, ImageTaskNetwork) and model.task.network_name == network
    x, targets = batch(2 if task == "segmentation" else 1)   # DeepLab's ASPP needs two
    losses = model(x, targets)["task"]
    assert torch.isfinite(losses["loss"])
    expected = {"detection": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
                              "loss_box_reg"},
                "depth": {"loss_rmse"},
                "segmentation": {"loss_seg"} | ({"loss_aux"} if network.endswith("resnet50")
                                                else set())}[task]
    assert set(losses) == expected | {"loss"}
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    # The task loss reaches the torchvision network, the synthesis before it and the encoder.
    for part in (model.task.network, model.task.adapter, model.g_a):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), type(part).__name__
    assert all(p.grad is None for p in model.probe.parameters())  # not in the task's graph

    model.eval()
    with torch.no_grad():
        prediction = model(x[:1])["task"]
    if task == "detection":
        assert set(prediction[0]) == {"boxes", "labels", "scores"}
    else:
        assert prediction.shape == (1, classes(task), SIZE, SIZE)


@pytest.mark.parametrize(("task", "network", "depth_target"), NETWORKS)
def test_base_layer_of_a_layered_bitstream_decodes_alone_to_the_forward_task_output(
        task, network, depth_target, tmp_path):
    args = {"kind": "scalable", "base": {**base_args(task, network, depth_target), "beta": 0.0},
            "N": 8, "M": 8, "method": "conditional", "target": "reconstruction",
            "num_classes": 3, "condition_decoder": True}
    codec = codec_for(tmp_path, args)
    x = scene(0)
    data = codec.compress(x)
    assert [layer.name for layer in layers_of(data)] == ["base", "enhancement"]
    decoded = codec.decompress(without_enhancement(data), layers={"base"}, previews=True)
    with torch.no_grad():
        forward = codec.model.base(x)       # eval mode: the rounded latent, predictions
    assert_same_prediction(decoded["task"], forward["task"])
    torch.testing.assert_close(decoded["preview"], forward["x_probe"].clamp(0, 1))


def test_weights_load_from_a_file_or_the_hub_cache_and_a_missing_file_is_one_line(
        tmp_path, monkeypatch):
    network = "lraspp_mobilenet_v3_large"
    source = build_base("depth", network).task.network
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)   # unlike any initialisation
    path = tmp_path / "lraspp.pth"
    torch.save(source.state_dict(), path)

    model = build_base("depth", network)
    synthesis_before = [p.clone() for p in model.task.adapter.parameters()]
    loaded, total = model.task.load_network_weights(resolve_weights(str(path), network))
    assert loaded == total == len(source.state_dict())
    for name, value in model.task.network.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    assert all(torch.equal(a, b) for a, b in
               zip(synthesis_before, model.task.adapter.parameters()))  # the network only

    # The hub cache: a file name there, or "hub" for torchvision's own file name.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = hub_checkpoints()
    assert hub == tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "mine.pth").write_bytes(path.read_bytes())
    assert resolve_weights("mine.pth", network) == hub / "mine.pth"
    with pytest.raises(ConfigError) as err:
        resolve_weights("hub", network)
    message = str(err.value)
    assert message.startswith(f"task_weights=hub: no such file (looked for {hub}/lraspp_")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^task_weights=gone.pth: no such file \(looked for "
                                          rf"gone.pth and {hub}/gone.pth\)$"):
        resolve_weights("gone.pth", network)

    # A checkpoint for other classes: the classifier is skipped, the rest is loaded.
    seg = build_base("segmentation", "deeplabv3_mobilenet_v3_large").task
    torch.save(seg.network.state_dict(), tmp_path / "seg.pth")
    other = BaseModel(N=8, M=8, task="segmentation", num_classes=3,
                      task_network="deeplabv3_mobilenet_v3_large").task
    loaded, total = other.load_network_weights(tmp_path / "seg.pth")
    assert loaded == total - 2  # the last convolution's weight and bias
    torch.save({"unrelated": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="none of its 1 tensors fit deeplabv3_mobilenet"):
        other.load_network_weights(tmp_path / "bad.pth")


def test_config_refuses_networks_that_do_not_serve_the_task():
    for values, message in [
        ({"task": "detection", "task_network": "deeplabv3_resnet50"},
         "task_network=deeplabv3_resnet50 is a segmentation network, not a detection one"),
        ({"task": "classification", "task_network": "image"},
         "task_network=image is available for detection, depth, segmentation, "
         "not task=classification"),
        ({"task_weights": "x.pth"},
         "task_weights loads a torchvision network: it needs task_network=image "
         "(or a network name)"),
        ({"task": "detection", "depth_target": "disparity"},
         "depth_target=disparity needs task=depth"),
    ]:
        with pytest.raises(ConfigError) as err:
            BaseConfig.from_dict(values)
        assert str(err.value) == message


@pytest.mark.slow
@pytest.mark.server
def test_train_base_records_the_network_and_evaluate_rebuilds_it(mlflow_server, tmp_path,
                                                                 monkeypatch):
    """A depth base with LR-ASPP on disparity, from a weights file, trained one step and
    evaluated with real bytes: the choice travels in the checkpoint."""
    import tempfile

    import mlflow

    from taskcodec.engine import train
    from taskcodec.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # checkpoints fetched by run id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "image-tasks")
    network = "lraspp_mobilenet_v3_large"
    torch.save(build_base("depth", network).task.network.state_dict(), tmp_path / "w.pth")
    config = BaseConfig.from_dict({
        "task": "depth", "task_network": "image", "depth_target": "disparity",
        "task_weights": str(tmp_path / "w.pth"), "N": 8, "M": 8, "image_size": SIZE,
        "batch_size": 1, "max_steps": 1, "epoch_length": 1, "max_val_images": 1,
        "synthesis_width": 12, "log_every": 1, "device": "cpu"})
    run_id = train(config)
    result = evaluate(EvalConfig.from_dict({"checkpoint": run_id, "max_images": 1}))
    summary = result["summary"]
    assert {"disparity_rmse", "disparity_abs_rel", "psnr_base", "bpp"} <= set(summary)
    assert "abs_rel" not in summary  # disparity, not metric depth

    trained = mlflow.get_run(run_id).data
    assert trained.params["task_network"] == "image"
    assert trained.params["synthesis_width"] == "12"
    assert trained.tags["task_network"] == network
    assert trained.tags["synthesis_width"] == "12"
    assert "val_disparity_rmse" in trained.metrics and "val_psnr_base" in trained.metrics
    assert mlflow.get_run(result["run_id"]).data.tags["task_network"] == network
    artifacts = mlflow.MlflowClient().list_artifacts(result["run_id"], "evaluation")
    assert {"evaluation/per_image.csv", "evaluation/previews.png"} <= {a.path for a in artifacts}

    runs = len(mlflow.search_runs(experiment_names=["image-tasks"]))
    with pytest.raises(ConfigError, match="task_weights=gone.pth: no such file"):
        train(BaseConfig.from_dict({**config.to_dict(), "task_weights": "gone.pth"}))
    assert len(mlflow.search_runs(experiment_names=["image-tasks"])) == runs  # none started
