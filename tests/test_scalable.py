"""Scalable coding for humans and machines (issue 4): base and enhancement layers.

* what the enhancement methods condition on (conditional: the base latent; standalone: nothing;
  residual: a prediction of the input made from it);
* real layered bitstreams for every method and base entropy model, decoded to exactly what the
  forward pass gives, and the base layer decoded alone from a file whose enhancement bytes are
  cut off or corrupt;
* the two training entry points on a real MLflow server (the base fetched by run id, lineage
  tags, frozen base weights), evaluation with real bytes, and the CLI's compress/decompress.

Models are tiny (N = M = 8, 64 px scenes). The fast tests build them in memory and save them in
the engine's checkpoint format; the ``server`` tests train with the CLI in this process (no
start-up cost) except one subprocess that checks what a user sees on an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from taskcodec import bitstream, checkpoints
from taskcodec.codecs.loading import LoadedCodec, load_codec
from taskcodec.codecs.rebuild import build_from_args
from taskcodec.codecs.scalable import EnhancementModel
from taskcodec.config import EnhancementConfig
from taskcodec.data import ScenesDataset
from taskcodec.errors import BitstreamError, ConfigError
from taskcodec.outputs import write_image

BIN = Path(sys.executable).parent
N = M = 8
SIZE = 64
DET_CLASSES = len(ScenesDataset.classes)      # with "__background__"
SEG_CLASSES = len(ScenesDataset.seg_classes)
TINY = ["--N", "8", "--M", "8", "--image-size", "64", "--batch-size", "2", "--max-steps", "2",
        "--epoch-length", "4", "--max-val-images", "1", "--log-every", "1"]


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_tmp(monkeypatch, tmp_path):
    """Checkpoints fetched by run id go to a new temporary folder: keep those under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def scene(index: int = 0, size: int | tuple[int, int] = SIZE) -> torch.Tensor:
    """A validation scene as a 1x3xHxW batch."""
    return ScenesDataset("val", size=size)[index][0].unsqueeze(0)


def base_args(task: str = "detection", entropy_model: str = "factorized") -> dict:
    classes = {"detection": DET_CLASSES, "segmentation": SEG_CLASSES}.get(task, 1)
    return {"kind": "base", "N": N, "M": M, "task": task, "entropy_model": entropy_model,
            "num_classes": classes, "synthesis_head": False}


def scalable_args(method: str, *, target: str = "reconstruction", **base) -> dict:
    """Model args as train-enhancement writes them today."""
    return {"kind": "scalable", "base": {**base_args(**base), "beta": 0.0}, "N": N, "M": M,
            "method": method, "target": target,
            "num_classes": SEG_CLASSES if target == "segmentation" else 3,
            "condition_decoder": method == "conditional-decoder", "cond_channels": N,
            "cond_layers": 3, "cond_kernel": 5}


def legacy_args(method: str) -> dict:
    """Model args of a checkpoint written before conditional-decoder had its own name."""
    args = scalable_args(method)
    for key in ("cond_channels", "cond_layers", "cond_kernel"):
        del args[key]
    return {**args, "condition_decoder": True}


def save_checkpoint(args: dict, path: Path, *, config: dict | None = None, seed: int = 0) -> Path:
    """Random weights for ``args`` saved the way ``Trainer._checkpoint`` saves them."""
    torch.manual_seed(seed)
    model = build_from_args(args)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    entry = {"codec": "train", "base": "train-base", "scalable": "train-enhancement"}[args["kind"]]
    ckpt = {"format": checkpoints.FORMAT, "codec": args["kind"], "entry_point": entry,
            "model_args": args, "config": {"image_size": SIZE, "seed": 0, "data": "scenes",
                                           **(config or {})},
            "model": state, "fingerprint": bitstream.checkpoint_fingerprint(state),
            "epoch": 1, "epoch_step": 0, "step": 1, "best": None, "run_id": ""}
    return checkpoints.save_atomic(ckpt, path)


def codec_for(tmp_path: Path, args: dict, name: str = "model", **kw) -> LoadedCodec:
    """Saved, then loaded as ``compress``/``decompress``/``evaluate`` load a checkpoint."""
    return load_codec(str(save_checkpoint(args, tmp_path / f"{name}.pt", **kw)))


def layers_of(data: bytes) -> list[bitstream.Layer]:
    return bitstream.unpack(data)[1]


def without_enhancement(data: bytes) -> bytes:
    """The file cut right after the base layer (the enhancement payload comes last)."""
    layers = layers_of(data)
    assert [layer.name for layer in layers] == ["base", "enhancement"]
    return data[:len(data) - layers[1].payload_size]


def assert_same_prediction(a, b) -> None:
    if isinstance(a, list):  # detections
        assert len(a) == len(b)
        for da, db in zip(a, b):
            assert da.keys() == db.keys()
            for key in da:
                assert torch.equal(da[key], db[key]), key
    else:
        assert torch.equal(a, b)


def two_base_latents() -> tuple[torch.Tensor, torch.Tensor]:
    """Two different quantized base latents of a 64 px image (an untrained base codes zeros)."""
    generator = torch.Generator().manual_seed(1)
    y1, y2 = (torch.randn(1, M, SIZE // 16, SIZE // 16, generator=generator).mul(3).round()
              for _ in range(2))
    assert not torch.equal(y1, y2)
    return y1, y2


def same_weights(*methods: str, **kw) -> list[EnhancementModel]:
    torch.manual_seed(0)
    first = EnhancementModel(N=N, M=M, M_base=M, method=methods[0], **kw)
    models = [first]
    for method in methods[1:]:
        other = EnhancementModel(N=N, M=M, M_base=M, method=method, **kw)
        other.load_state_dict(first.state_dict())
        models.append(other)
    for model in models:
        model.eval().update(force=True)
    return models


def run_cli(*args: str) -> tuple[int, str, str]:
    """``taskcodec ARGS`` in this process: (exit status, stdout, stderr)."""
    from taskcodec.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_ok(*args: str) -> str:
    status, out, err = run_cli(*args)
    assert status == 0, err[-3000:]
    return out


def one_error_line(status: int, stderr: str) -> str:
    """The single ``Error:`` line a refused command prints (and nothing else of note)."""
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def write_scene_png(path: Path, size: tuple[int, int] = (80, 96)) -> Path:
    """A scene whose sides are not multiples of 64, so decoding must crop the padding."""
    return write_image(scene(2, size), path)


# --- 1. what each method conditions on --------------------------------------------------------


def test_default_conditional_decoder_sees_only_the_enhancement_latent():
    """Both papers: only the entropy model is conditioned; the decoder gets y_e alone."""
    conditional, with_decoder = same_weights("conditional"), same_weights("conditional-decoder")
    conditional, with_decoder = conditional[0], with_decoder[0]
    assert EnhancementConfig.from_dict({"base_run": "0" * 32}).method == "conditional"
    y1, y2 = two_base_latents()
    y_e = torch.randn(1, M, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(2))
    x = scene(3)
    with torch.no_grad():
        assert torch.equal(conditional.decode(y_e, y1), conditional.decode(y_e, y2))
        assert not torch.allclose(with_decoder.decode(y_e, y1), with_decoder.decode(y_e, y2))
        c1, c2 = conditional(x, y1), conditional(x, y2)
    # ... while p(y_e | z_e, y_b) changes with the base latent (z_e's prior does not see it).
    assert not torch.allclose(c1["likelihoods"]["y_e"], c2["likelihoods"]["y_e"])
    assert torch.equal(c1["likelihoods"]["z_e"], c2["likelihoods"]["z_e"])
    # The condition path is the configured one; the decoder's input is y_e's M channels.
    assert conditional.g_s[0].in_channels == M and with_decoder.g_s[0].in_channels == 2 * M
    assert [m.kernel_size for m in conditional.cond if isinstance(m, torch.nn.Conv2d)] == \
        [(5, 5)] * 3


@pytest.mark.parametrize("method", ["conditional", "conditional-decoder"])
def test_conditional_depends_on_the_base_latent_and_the_refit_zeroes_it(method):
    # paper 2's standalone re-fits the paper-faithful conditional; the former standalone
    # (stored runs) came with either decoder
    decoder = method == "conditional-decoder"
    zeroed = ("standalone",) if decoder else ("standalone-refit", "standalone")
    conditional, *others = same_weights(method, *zeroed, condition_decoder=decoder)
    assert others[-1].condition_decoder == decoder
    refit = others[0]
    y1, y2 = two_base_latents()
    x = scene(3)
    with torch.no_grad():
        c1, c2 = conditional(x, y1), conditional(x, y2)
        c0 = conditional(x, torch.zeros_like(y1))
        outputs = {name: (model(x, y1), model(x, y2)) for name, model in zip(zeroed, others)}
    assert not torch.allclose(c1["likelihoods"]["y_e"], c2["likelihoods"]["y_e"])
    # Paper 2's standalone and the former standalone: the condition is zeroed, whatever the
    # base says.
    for name, (s1, s2) in outputs.items():
        for key in ("y_e", "z_e"):
            assert torch.equal(s1["likelihoods"][key], s2["likelihoods"][key]), name
            assert torch.equal(s1["likelihoods"][key], c0["likelihoods"][key]), name
        assert torch.equal(s1["x_hat"], s2["x_hat"]) and torch.equal(s1["x_hat"], c0["x_hat"])

    # The same holds for real bitstreams: decoding conditional strings needs the right base.
    with torch.no_grad():
        enc = conditional.compress(x, y1)
        right = conditional.decompress(enc["strings"], enc["shape"], y1)["x_hat"]
        wrong = conditional.decompress(enc["strings"], enc["shape"], y2)["x_hat"]
        s_enc1, s_enc2 = refit.compress(x, y1), refit.compress(x, y2)
        s_dec = refit.decompress(s_enc1["strings"], s_enc1["shape"], y2)["x_hat"]
    torch.testing.assert_close(right, c1["x_hat"].clamp(0, 1), atol=1e-5, rtol=0)
    assert not torch.allclose(right, wrong)
    assert s_enc1["strings"] == s_enc2["strings"]
    torch.testing.assert_close(s_dec, outputs[zeroed[0]][0]["x_hat"].clamp(0, 1), atol=1e-5,
                               rtol=0)


def test_standalone_refit_trains_only_the_entropy_model():
    (refit,) = same_weights("standalone-refit")
    trainable = {n for n, p in refit.named_parameters() if p.requires_grad}
    assert trainable == set(refit.entropy_model_parameter_names())
    assert trainable and all(n.startswith(("coder.", "cond.")) for n in trainable)
    assert not any(p.requires_grad for p in (*refit.g_a.parameters(), *refit.g_s.parameters()))


def test_lower_and_upper_differ_only_in_rate_accounting():
    """Paper 1's baselines: one architecture and one training signal; upper's base is free."""
    from taskcodec.recipes import EnhancementRecipe

    x = scene(1)
    models, parts = {}, {}
    for method in ("lower", "upper"):
        torch.manual_seed(3)
        models[method] = model = build_from_args(scalable_args(method)).train()
        assert not hasattr(model.enhancement, "cond") and model.enhancement.coder.cond_channels == 0
        recipe = EnhancementRecipe(EnhancementConfig.from_dict({"base_run": "0" * 32,
                                                                "method": method}))
        torch.manual_seed(4)  # the same quantisation noise
        parts[method] = recipe._parts(model, x, None, model(x))
        model.zero_grad()
        parts[method]["loss"].backward()
    lower, upper = models["lower"], models["upper"]
    assert lower.state_dict().keys() == upper.state_dict().keys()
    assert all(torch.equal(v, upper.state_dict()[k]) for k, v in lower.state_dict().items())
    for key in ("bpp_base", "bpp_enh", "mse_loss"):
        assert torch.equal(parts["lower"][key], parts["upper"][key]), key
    assert parts["lower"]["bpp_base"] > 0
    assert torch.equal(parts["upper"]["bpp_loss"], parts["upper"]["bpp_enh"])
    torch.testing.assert_close(parts["lower"]["bpp_loss"],
                               parts["upper"]["bpp_enh"] + parts["upper"]["bpp_base"])
    grads = {m: {n: p.grad for n, p in models[m].named_parameters() if p.grad is not None}
             for m in models}
    assert grads["lower"].keys() == grads["upper"].keys() and grads["lower"]
    for name, grad in grads["lower"].items():  # the base's bits are a constant of the loss
        torch.testing.assert_close(grad, grads["upper"][name], rtol=1e-5, atol=1e-7)


def test_rmse_distortion_and_straight_through_quantisation():
    from taskcodec.codecs.scalable import HyperpriorCoder
    from taskcodec.recipes import EnhancementRecipe

    recipe = EnhancementRecipe(EnhancementConfig.from_dict(
        {"base_run": "0" * 32, "distortion": "rmse", "alpha": 2.0}))
    x = torch.full((2, 3, 16, 16), 0.5)
    x_hat = x + torch.tensor([1.0, 3.0]).view(2, 1, 1, 1) / 255  # per-image RMSE 1 and 3 (/255)
    ones = {"y": torch.ones(2, 1, 1, 1)}
    out = {"x_hat": x_hat, "likelihoods": {"y_e": torch.full((2, 1, 2, 2), 0.5)},
           "base_likelihoods": ones}
    parts = recipe._parts(None, x, None, out)
    assert float(parts["rmse_loss"]) == pytest.approx(2.0)       # 255 * mean(1, 3) / 255
    assert float(parts["bpp_loss"]) == pytest.approx(8 / (2 * 256))
    assert float(parts["loss"]) == pytest.approx(2.0 + 2.0 * 8 / 512)

    torch.manual_seed(0)
    coder = HyperpriorCoder(M, N).train()
    coder.ste = True
    coder.entropy_bottleneck.eval()  # z rounded, so both passes below see the same means
    y = torch.randn(1, M, 4, 4, requires_grad=True)
    y_hat, likelihoods = coder(y)
    scales, means = coder._params(coder.entropy_bottleneck(coder.h_a(y))[0], None)
    rounded, expected = coder.gaussian_conditional(y, scales, means, training=False)
    torch.testing.assert_close(y_hat, rounded)  # rounded as at test time, not noisy
    torch.testing.assert_close(likelihoods["y"], expected)
    y_hat.sum().backward()
    assert torch.all(y.grad != 0)  # the straight-through gradient reaches y


def test_legacy_conditional_checkpoints_load_as_conditional_decoder(tmp_path):
    from taskcodec.codecs.scalable import method_of

    old = legacy_args("conditional")
    assert method_of(old) == "conditional-decoder"
    assert method_of(scalable_args("conditional")) == "conditional"
    codec = codec_for(tmp_path, old)
    enhancement = codec.model.enhancement
    assert enhancement.method == "conditional-decoder" and enhancement.condition_decoder
    assert codec.name == "scalable-conditional-reconstruction"  # old files still decode
    assert [m.kernel_size for m in enhancement.cond if isinstance(m, torch.nn.Conv2d)] == \
        [(3, 3)] * 2
    x = scene(0)
    torch.testing.assert_close(codec.decompress(codec.compress(x))["x_hat"],
                               codec.model(x)["x_hat"].clamp(0, 1), atol=1e-5, rtol=0)
    config = EnhancementConfig.from_dict({"base_run": "0" * 32, "condition_decoder": "True"})
    assert config.method == "conditional-decoder"


def test_residual_adds_the_decoded_residual_to_a_prediction_from_the_base():
    (residual,) = same_weights("residual")
    assert residual.coder.cond_channels == 0  # the residual's entropy model is not conditional
    y1, y2 = two_base_latents()
    x = scene(3)
    with torch.no_grad():
        r1, r2 = residual(x, y1), residual(x, y2)
        enc = residual.compress(x, y1)
        dec1 = residual.decompress(enc["strings"], enc["shape"], y1)["x_hat"]
        dec2 = residual.decompress(enc["strings"], enc["shape"], y2)["x_hat"]
        shift = residual.predictor(y1) - residual.predictor(y2)
    # The reconstruction is built on the base's prediction ...
    assert not torch.allclose(r1["x_hat"], r2["x_hat"])
    torch.testing.assert_close(dec1, r1["x_hat"].clamp(0, 1), atol=1e-5, rtol=0)
    # ... and the same residual decoded on another base moves by the predictions' difference.
    inside = (dec1 > 0) & (dec1 < 1) & (dec2 > 0) & (dec2 < 1)
    assert inside.float().mean() > 0.05
    torch.testing.assert_close((dec1 - dec2)[inside], shift[inside], atol=1e-4, rtol=0)


# --- 2. real layered bitstreams --------------------------------------------------------------


# upper has lower's architecture, standalone-refit the former standalone's zeroed condition
@pytest.mark.parametrize(("method", "entropy_model"), [
    *((m, "factorized") for m in ("conditional", "conditional-decoder", "residual", "lower",
                                  "standalone")),
    *((m, "hyperprior") for m in ("conditional", "residual", "standalone-refit"))])
def test_layered_bitstream_decodes_to_the_forward_pass(method, entropy_model, tmp_path):
    codec = codec_for(tmp_path, scalable_args(method, entropy_model=entropy_model))
    assert codec.kind == "scalable" and codec.name == f"scalable-{method}-reconstruction"
    x = scene(0)
    data = codec.compress(x)
    layers = layers_of(data)
    assert [layer.name for layer in layers] == ["base", "enhancement"]
    assert all(layer.payload_size > 0 for layer in layers)
    assert len(layers[0].strings) == (1 if entropy_model == "factorized" else 2)

    decoded = codec.decompress(data)
    with torch.no_grad():
        forward = codec.model(x)
        base_forward = codec.model.base(x)
    assert decoded["x_hat"].shape == x.shape
    torch.testing.assert_close(decoded["x_hat"], forward["x_hat"].clamp(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(forward["y_hat_b"], base_forward["y_hat"])
    assert_same_prediction(decoded["task"], base_forward["task"])
    assert len(decoded["task"][0]["boxes"]) > 0  # so the comparisons above compare something


def test_segmentation_enhancement_decodes_to_the_forward_logits(tmp_path):
    codec = codec_for(tmp_path, scalable_args("conditional", target="segmentation",
                                              entropy_model="hyperprior"))
    x = scene(0)
    decoded = codec.decompress(codec.compress(x))
    with torch.no_grad():
        forward = codec.model(x)
    assert "x_hat" not in decoded
    assert decoded["logits"].shape == (1, SEG_CLASSES, SIZE, SIZE)
    torch.testing.assert_close(decoded["logits"], forward["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_base_layer_alone_decodes_the_task_without_the_enhancement_bytes(task, tmp_path):
    codec = codec_for(tmp_path, scalable_args("conditional", task=task))
    data = codec.compress(scene(0))
    full = codec.decompress(data)
    cut = without_enhancement(data)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF  # last byte: inside the enhancement payload

    for damaged in (cut, bytes(corrupt)):
        base_only = codec.decompress(damaged, layers={"base"})
        assert "x_hat" not in base_only and "logits" not in base_only
        assert_same_prediction(base_only["task"], full["task"])
    if task == "segmentation":
        assert full["task"].shape == (1, SEG_CLASSES, SIZE, SIZE)
    else:
        assert len(full["task"][0]["boxes"]) > 0

    # Both layers are needed for the reconstruction, and damage is found, not decoded.
    with pytest.raises(BitstreamError, match="truncated"):
        codec.decompress(cut)
    with pytest.raises(BitstreamError, match="CRC mismatch in layer 'enhancement'"):
        codec.decompress(bytes(corrupt))
    bad_base = bytearray(cut)
    bad_base[-1] ^= 0xFF  # last byte of the base payload
    with pytest.raises(BitstreamError, match="CRC mismatch in layer 'base'"):
        codec.decompress(bytes(bad_base), layers={"base"})


def test_base_checkpoint_codes_one_base_layer_that_decodes_to_the_task(tmp_path):
    codec = codec_for(tmp_path, base_args("detection", "hyperprior"), config={"beta": 0.0})
    assert codec.kind == "base" and codec.layer_names == ("base",)
    x = scene(0)
    data = codec.compress(x)
    assert [layer.name for layer in layers_of(data)] == ["base"]
    decoded = codec.decompress(data)
    with torch.no_grad():
        expected = codec.model(x)["task"]
    assert "x_hat" not in decoded
    assert_same_prediction(decoded["task"], expected)


def test_files_with_other_layers_or_weights_are_refused(tmp_path):
    scalable = codec_for(tmp_path, scalable_args("conditional"), "scalable")
    base = codec_for(tmp_path, base_args(), "base", seed=3)
    x = scene(0)
    data = scalable.compress(x)

    # Same weights, but the file lost its enhancement layer (rewritten with the base alone).
    header, layers = bitstream.unpack(data)
    base_only_file = bitstream.pack(header, layers[:1])
    with pytest.raises(BitstreamError, match="bitstream has layers base; .* writes base, "
                                             "enhancement"):
        scalable.decompress(base_only_file)
    assert_same_prediction(scalable.decompress(base_only_file, layers={"base"})["task"],
                           scalable.decompress(data)["task"])
    # A single-layer file of another checkpoint is refused before any decoding.
    with pytest.raises(BitstreamError, match="was made with checkpoint .* of codec 'base-detection'"):
        scalable.decompress(base.compress(x), layers={"base"})
    with pytest.raises(BitstreamError, match="of codec 'scalable-conditional-reconstruction'"):
        base.decompress(data, layers={"base"})


def test_decompress_cli_writes_the_tasks_format_for_local_checkpoints(tmp_path):
    """The CLI on checkpoint files: detections JSON from the base alone, a class-id PNG of the
    image's size from a segmentation enhancement."""
    from PIL import Image

    image = write_scene_png(tmp_path / "scene.png")
    ckpt = save_checkpoint(scalable_args("conditional", target="segmentation"),
                           tmp_path / "seg.pt")
    run_ok("compress", image, "-o", tmp_path / "f.tcd", "-c", ckpt)
    run_ok("decompress", tmp_path / "f.tcd", "-o", tmp_path / "seg.png", "-c", ckpt)
    with Image.open(tmp_path / "seg.png") as seg:
        assert seg.mode == "L" and seg.size == (96, 80)
        assert max(seg.getdata()) < SEG_CLASSES
    run_ok("decompress", tmp_path / "f.tcd", "--layer", "base", "-o", tmp_path / "d.json",
           "-c", ckpt)
    assert isinstance(json.loads((tmp_path / "d.json").read_text()), list)


def test_evaluation_scores_each_layer_on_its_own_targets(tmp_path):
    """A depth base with a segmentation enhancement on Cityscapes (as in the papers): the
    evaluation data must carry both depth and masks."""
    from taskcodec.config import EvalConfig
    from taskcodec.evaluate import _evaluate_task
    from test_task_data import make_cityscapes

    root = make_cityscapes(tmp_path / "cityscapes")
    args = scalable_args("conditional", target="segmentation", task="depth")
    args["num_classes"] = 19  # Cityscapes train ids
    codec = codec_for(tmp_path, args)
    summary, rows, info = _evaluate_task(
        EvalConfig(checkpoint="unused", data=f"cityscapes:{root}", max_images=2), codec)
    assert (info["task"], info["target"]) == ("depth", "segmentation")
    assert info["previews"] == ([], [])  # a beta = 0 base without a probe shows nothing
    assert (info["data"]["data_name"], info["data"]["images"]) == ("cityscapes", 2)
    assert len(rows) == 2
    assert {"abs_rel", "rmse", "delta1", "miou", "bpp", "bpp_base", "bpp_enh"} <= set(summary)
    assert summary["bpp"] == pytest.approx(summary["bpp_base"] + summary["bpp_enh"])
    assert 0 <= summary["miou"] <= 1


# --- 4. the base layer's reconstruction probe and previews ------------------------------------


@pytest.mark.parametrize("beta", [0.0, 20.0])
def test_the_probe_learns_from_a_detached_latent_and_leaves_the_base_gradients_unchanged(beta, torch_one_thread):
    """Paper 2's reconstruction probe measures the base without shaping it: every base
    parameter gets exactly the gradient it gets without a probe, also after clipping."""
    from taskcodec.config import BaseConfig
    from taskcodec.recipes import BaseRecipe

    args = {**base_args("detection"), "synthesis_head": beta > 0}
    torch.manual_seed(0)
    plain, probed = build_from_args(args), build_from_args({**args, "probe": True})
    missing, unexpected = probed.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("probe.") for k in missing) and not unexpected
    recipe = BaseRecipe(BaseConfig.from_dict({"beta": beta, "N": N, "M": M, "image_size": SIZE,
                                              "clip_max_norm": 0.01}))
    items = [ScenesDataset("train", size=SIZE)[i] for i in range(2)]
    x, targets = torch.stack([image for image, _ in items]), [t for _, t in items]

    def gradients(model, groups):
        model.train().zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same quantisation noise and sampled anchors
        parts = recipe._parts(model, x, targets, model(x, targets))
        parts["loss"].backward()
        for group in groups(model):
            torch.nn.utils.clip_grad_norm_(group, 0.01)
        return parts, {n: p.grad for n, p in model.named_parameters()}

    _, without = gradients(plain, recipe.clip_groups)
    parts, with_probe = gradients(probed, recipe.clip_groups)
    assert parts["probe_mse"] > 0 and ("recon_mse" in parts) == (beta > 0)
    for name, grad in without.items():  # (the quantiles have none: they are the aux loss's)
        assert (grad is None and with_probe[name] is None) or torch.equal(grad, with_probe[name]), name
    probe = [n for n in with_probe if n.startswith("probe.")]
    assert probe and all(with_probe[n].abs().sum() > 0 for n in probe)
    # Clipped together, the probe's gradients would change the base's: why it has its own group.
    _, joint = gradients(probed, lambda model: [list(model.parameters())])
    assert not torch.equal(joint["g_a.0.weight"], without["g_a.0.weight"])


def test_evaluation_logs_the_base_preview_and_the_residual_prediction(tmp_path, torch_one_thread):
    """psnr_base: the base layer's preview (its probe, else the beta > 0 head), for base and
    scalable files; psnr_pred: a residual codec's prediction from the base; both decoded from
    the base layer of real bytes."""
    from taskcodec.config import EvalConfig
    from taskcodec.evaluate import _evaluate_task
    from taskcodec.metrics import psnr

    evaluate = EvalConfig(checkpoint="unused", max_images=2)
    probed = {**base_args(), "probe": True}
    residual = codec_for(tmp_path, {**scalable_args("residual"), "base": {**probed, "beta": 0.0}},
                         "residual")
    summary, rows, info = _evaluate_task(evaluate, residual)
    originals, previews = info["previews"]
    assert len(originals) == len(previews) == 2 and previews[0].shape == (3, SIZE, SIZE)
    x = scene(0)
    with torch.no_grad():
        y_hat_b = residual.model.base(x)["y_hat"]
        preview = residual.model.base.probe(y_hat_b).clamp(0, 1)
        prediction = residual.model.enhancement.predictor(y_hat_b).clamp(0, 1)
    assert rows[0]["psnr_base"] == pytest.approx(psnr(x, preview), rel=1e-5)
    assert rows[0]["psnr_pred"] == pytest.approx(psnr(x, prediction), rel=1e-5)
    assert summary["psnr_base"] == pytest.approx((rows[0]["psnr_base"] + rows[1]["psnr_base"]) / 2)

    evaluate = EvalConfig(checkpoint="unused", max_images=1)
    head_only = codec_for(tmp_path, {**base_args(), "synthesis_head": True}, "beta")
    summary, rows, _ = _evaluate_task(evaluate, head_only)
    with torch.no_grad():
        preview = head_only.model.g_s(head_only.model(x)["y_hat"]).clamp(0, 1)
    assert rows[0]["psnr_base"] == pytest.approx(psnr(x, preview), rel=1e-5)
    assert "psnr_pred" not in summary
    summary, _, _ = _evaluate_task(evaluate, codec_for(tmp_path, base_args(), "plain"))
    assert "psnr_base" not in summary  # beta = 0 without a probe shows nothing


def test_upper_baseline_is_charged_the_enhancement_bytes_only(tmp_path):
    from taskcodec.config import EvalConfig
    from taskcodec.evaluate import _evaluate_task

    summaries = {}
    for method in ("lower", "upper"):
        codec = codec_for(tmp_path, scalable_args(method), name=method, seed=5)
        summaries[method], _, _ = _evaluate_task(
            EvalConfig(checkpoint="unused", data="scenes", max_images=1), codec)
    lower, upper = summaries["lower"], summaries["upper"]
    for key in ("bpp_base", "bpp_enh", "bpp_file", "psnr", "header_bytes",
                "bpp_base_estimated", "bpp_enh_estimated"):
        assert lower[key] == pytest.approx(upper[key], rel=1e-6), key
    assert lower["bpp"] == pytest.approx(lower["bpp_base"] + lower["bpp_enh"])
    assert upper["bpp"] == pytest.approx(upper["bpp_enh"])
    assert upper["bpp_estimated"] == pytest.approx(upper["bpp_enh_estimated"])
    assert lower["bpp_estimated"] == pytest.approx(lower["bpp_base_estimated"]
                                                   + lower["bpp_enh_estimated"])


# --- 5. refused settings (no server needed) ---------------------------------------------------


def test_residual_enhancement_for_segmentation_is_refused():
    message = "method=residual needs target=reconstruction (use conditional for segmentation)"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EnhancementConfig.from_dict({"base_run": "0" * 32, "method": "residual",
                                     "target": "segmentation"})
    with pytest.raises(ConfigError, match="method=residual .* needs target=reconstruction"):
        EnhancementModel(N=N, M=M, M_base=M, method="residual", target="segmentation")
    status, _, err = run_cli("train-enhancement", "--base-run", "0" * 32,
                             "--method", "residual", "--target", "segmentation")
    assert one_error_line(status, err) == f"Error: {message}"


def test_former_standalone_and_a_refit_without_its_source_are_refused():
    for settings, message in (
            ({"method": "standalone"}, "method=standalone is now named lower"),
            ({"method": "standalone-refit"}, "method=standalone-refit needs --init-from"),
            ({"method": "conditional", "target": "segmentation", "distortion": "rmse"},
             "distortion=rmse is a reconstruction distortion")):
        with pytest.raises(ConfigError, match=message):
            EnhancementConfig.from_dict({"base_run": "0" * 32, **settings})
    # a stored standalone run still resumes
    assert EnhancementConfig.from_dict({"base_run": "0" * 32, "method": "standalone",
                                        "resume": "1" * 32}).method == "standalone"


def test_train_enhancement_without_a_base_run_is_refused():
    status, _, err = run_cli("train-enhancement", "--method", "conditional")
    assert one_error_line(status, err).startswith("Error: base_run is required")


# --- 3-6. training, evaluation and the CLI against a real MLflow server -----------------------


@dataclass(frozen=True)
class Runs:
    base: str
    enhancement: str
    work: Path


def run_id_from(stdout: str) -> str:
    run_id = stdout.strip().splitlines()[-1].split()[-1]
    assert len(run_id) == 32, stdout
    return run_id


@pytest.fixture(scope="module")
def runs(mlflow_server, tmp_path_factory, module_env) -> Runs:
    """A detection base (train-base) and a conditional enhancement on it, fetched by run id."""
    work = tmp_path_factory.mktemp("scalable-runs")
    with module_env(mlflow_server.uri, work, "scalable-tests"):
        base = run_id_from(run_ok("train-base", "--task", "detection", *TINY))
        enhancement = run_id_from(run_ok("train-enhancement", "--base-run", base,
                                         "--method", "conditional", "--alpha", "0.01", *TINY))
    return Runs(base, enhancement, work)


@pytest.fixture(scope="module")
def codec_run(mlflow_server, tmp_path_factory, module_env) -> str:
    """A plain single-layer ``train`` run."""
    work = tmp_path_factory.mktemp("codec-run")
    with module_env(mlflow_server.uri, work, "scalable-tests"):
        return run_id_from(run_ok("train", "--N", "8", "--M", "8", "--patch-size", "32",
                                  "--batch-size", "2", "--max-steps", "1",
                                  "--max-val-images", "1", "--max-side", "128"))


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def fetch(run_id: str, which: str, folder: Path) -> dict:
    return checkpoints.load(checkpoints.resolve(run_id, which, folder))


@pytest.mark.slow
@pytest.mark.server
def test_enhancement_run_links_its_frozen_base_fetched_by_run_id(runs, mlflow_server, tmp_path):
    c = client(mlflow_server.uri)
    base_run, enh_run = c.get_run(runs.base), c.get_run(runs.enhancement)
    assert base_run.info.status == enh_run.info.status == "FINISHED"
    assert {k: base_run.data.tags.get(k) for k in ("layer", "task", "beta", "entry_point")} == {
        "layer": "base", "task": "detection", "beta": "0.0", "entry_point": "train-base"}
    assert {k: enh_run.data.tags.get(k) for k in
            ("method", "target", "base_run_id", "task", "layer", "alpha", "beta",
             "entry_point")} == {
        "method": "conditional", "target": "reconstruction", "base_run_id": runs.base,
        "task": "detection", "layer": "enhancement", "alpha": "0.01", "beta": "0.0",
        "entry_point": "train-enhancement"}
    params = enh_run.data.params
    assert {k: params.get(k) for k in ("base_run", "method", "target", "alpha", "N", "M",
                                       "image_size", "condition_decoder")} == {
        "base_run": runs.base, "method": "conditional", "target": "reconstruction",
        "alpha": "0.01", "N": "8", "M": "8", "image_size": "64", "condition_decoder": "False"}
    assert {k: enh_run.data.tags.get(k) for k in ("defined_by", "condition_decoder")} == {
        "defined_by": "paper1+paper2", "condition_decoder": "false"}
    counts = {k: int(v) for k, v in params.items() if k.startswith("params_")}
    assert set(counts) >= {"params_total", "params_base", "params_enh", "params_enh_g_a",
                           "params_enh_g_s", "params_enh_condition", "params_enh_entropy_model",
                           "params_base_g_a", "params_base_entropy_model", "params_trainable"}
    assert counts["params_total"] == counts["params_base"] + counts["params_enh"]
    assert counts["params_trainable"] == counts["params_enh"] > counts["params_enh_condition"] > 0
    history = c.get_metric_history(runs.enhancement, "bpp_enh")
    assert sorted(m.step for m in history) == [1, 2]

    base_ckpt = fetch(runs.base, "best", tmp_path / "base")
    args = None
    for which in ("best", "last"):  # last: after the final optimizer step
        enh_ckpt = fetch(runs.enhancement, which, tmp_path / which)
        args = enh_ckpt["model_args"]
        state = enh_ckpt["model"]
        base_part = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
        assert base_part.keys() == base_ckpt["model"].keys()
        changed = [k for k, v in base_part.items() if not torch.equal(v, base_ckpt["model"][k])]
        assert changed == [], f"{which}.pt: training changed base weights {changed[:5]}"
        assert any(k.startswith("enhancement.") for k in state)
    assert enh_ckpt["step"] == 2
    assert args["kind"] == "scalable" and args["method"] == "conditional"
    assert args["base_fingerprint"] == base_ckpt["fingerprint"]
    assert {k: v for k, v in args["base"].items() if k != "beta"} == base_ckpt["model_args"]


@pytest.mark.slow
@pytest.mark.server
def test_evaluate_logs_the_rate_of_each_layer_and_both_tasks(runs, mlflow_server):
    out = run_ok("evaluate", "--checkpoint", runs.enhancement, "--max-images", "2")
    run = client(mlflow_server.uri).get_run(run_id_from(out))
    metrics = run.data.metrics
    assert {"bpp", "bpp_base", "bpp_enh", "psnr", "ms_ssim", "map", "map50",
            "psnr_base"} <= set(metrics)  # the base trained a probe (on by default)
    assert metrics["bpp"] == pytest.approx(metrics["bpp_base"] + metrics["bpp_enh"], rel=1e-9)
    assert 0 < metrics["bpp_enh"] < metrics["bpp"] and 0 < metrics["bpp_base"] < metrics["bpp"]
    assert 0 < metrics["psnr"] < 100 and 0 <= metrics["map"] <= 1
    # the papers' view: rates the likelihoods promise, and the container header on its own
    assert metrics["bpp_estimated"] == pytest.approx(
        metrics["bpp_base_estimated"] + metrics["bpp_enh_estimated"], rel=1e-6)
    assert 0 < metrics["bpp_enh_estimated"] and 0 < metrics["bpp_base_estimated"]
    assert metrics["header_bytes"] > 20 and metrics["bpp_file"] == metrics["bpp"]
    assert metrics["bpp_header"] == pytest.approx(8 * metrics["header_bytes"] / 64 ** 2)
    assert metrics["bpp_header"] < metrics["bpp_base"]
    tags = run.data.tags
    assert {k: tags.get(k) for k in ("entry_point", "method", "target", "task", "base_run_id",
                                     "evaluated_run_id", "beta")} == {
        "entry_point": "evaluate", "method": "conditional", "target": "reconstruction",
        "task": "detection", "base_run_id": runs.base, "evaluated_run_id": runs.enhancement,
        "beta": "0.0"}
    assert run.data.params["images"] == "2"
    # replicates are grouped by seed and paired on the data seed: both logged
    assert {k: (tags[k], run.data.params[k]) for k in ("seed", "data_seed")} == {
        "seed": ("0", "0"), "data_seed": ("0", "0")}


@pytest.mark.slow
@pytest.mark.server
def test_cli_decodes_the_base_layer_alone_or_both_layers(runs, mlflow_server, tmp_path):
    from PIL import Image

    image = write_scene_png(tmp_path / "scene.png")  # 96x80
    tcd = tmp_path / "f.tcd"
    run_ok("compress", image, "-o", tcd, "-c", runs.enhancement)
    run_ok("decompress", tcd, "--layer", "base", "-o", tmp_path / "dets.json",
           "-c", runs.enhancement)
    detections = json.loads((tmp_path / "dets.json").read_text())
    assert isinstance(detections, list) and detections
    for det in detections:
        assert set(det) == {"image_id", "category_id", "bbox", "score"}
        x, y, w, h = det["bbox"]
        assert 0 <= x <= x + w <= 96 and 0 <= y <= y + h <= 80
        assert 1 <= det["category_id"] < DET_CLASSES and 0 <= det["score"] <= 1

    # Without the enhancement bytes the base layer still gives the same detections ...
    cut = tmp_path / "cut.tcd"
    cut.write_bytes(without_enhancement(tcd.read_bytes()))
    run_ok("decompress", cut, "--layer", "base", "-o", tmp_path / "dets_cut.json",
           "-c", runs.enhancement)
    assert json.loads((tmp_path / "dets_cut.json").read_text()) == detections
    # ... but not a reconstruction.
    status, _, err = run_cli("decompress", cut, "-o", tmp_path / "no.png", "-c", runs.enhancement)
    line = one_error_line(status, err)
    assert str(cut) in line and "truncated" in line
    assert not (tmp_path / "no.png").exists()

    run_ok("decompress", tcd, "-o", tmp_path / "rec.png", "-c", runs.enhancement)
    with Image.open(tmp_path / "rec.png") as rec:
        assert rec.format == "PNG" and rec.mode == "RGB" and rec.size == (96, 80)


@pytest.mark.slow
@pytest.mark.server
def test_a_single_layer_file_decoded_with_the_scalable_checkpoint_is_one_error(
        runs, codec_run, mlflow_server, tmp_path):
    image = write_scene_png(tmp_path / "scene.png")
    single = tmp_path / "single.tcd"
    run_ok("compress", image, "-o", single, "-c", codec_run)
    based = tmp_path / "base.tcd"
    run_ok("compress", image, "-o", based, "-c", runs.base)
    for layer in ("all", "base"):
        status, _, err = run_cli("decompress", based, "--layer", layer, "-o", tmp_path / "x",
                                 "-c", runs.enhancement)
        assert "of codec 'base-detection'" in one_error_line(status, err)

    # What a user sees: a real process, its exit status and its whole stderr.
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server.uri
    proc = subprocess.run([str(BIN / "taskcodec"), "decompress", str(single), "-o",
                           str(tmp_path / "out.png"), "-c", runs.enhancement],
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {single}: "), proc.stderr
    assert "bmshj2018-factorized" in lines[0] and "scalable-conditional" in lines[0]
    assert not (tmp_path / "out.png").exists()


@pytest.mark.slow
@pytest.mark.server
def test_base_run_that_is_not_a_train_base_run_is_refused_before_a_run_starts(
        runs, codec_run, mlflow_server, monkeypatch, tmp_path):
    experiment = f"refused-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    monkeypatch.chdir(tmp_path)
    for run_id, kind in ((codec_run, "codec"), (runs.enhancement, "scalable")):
        status, _, err = run_cli("train-enhancement", "--base-run", run_id, *TINY)
        assert one_error_line(status, err) == (
            f"Error: base_run={run_id}: its checkpoint is a {kind} model, not a train-base run")
    c = client(mlflow_server.uri)
    found = c.get_experiment_by_name(experiment)
    assert found is None or not c.search_runs([found.experiment_id])


@pytest.mark.slow
@pytest.mark.server
def test_standalone_refit_changes_only_the_entropy_model_of_its_conditional_source(
        runs, mlflow_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli("train-enhancement", "--base-run", runs.base, "--method",
                             "standalone-refit", "--init-from", runs.base, *TINY)
    # refused before any run is made: a refit starts from a conditional enhancement's weights
    assert (f"init_from={runs.base} is a train-base checkpoint; train-enhancement cannot start "
            "from its weights") in one_error_line(status, err)
    refit = run_id_from(run_ok("train-enhancement", "--base-run", runs.base, "--method",
                               "standalone-refit", "--init-from", runs.enhancement,
                               "--alpha", "0.01", "--lr", "0.01", *TINY))
    tags = client(mlflow_server.uri).get_run(refit).data.tags
    assert {k: tags.get(k) for k in ("method", "baseline_of", "defined_by", "init_from")} == {
        "method": "standalone-refit", "baseline_of": "paper2-standalone",
        "defined_by": "paper2", "init_from": runs.enhancement}
    source = fetch(runs.enhancement, "best", tmp_path / "source")["model"]
    after = fetch(refit, "last", tmp_path / "refit")["model"]
    assert source.keys() == after.keys()
    changed = {k for k in source if not torch.equal(source[k], after[k])}
    entropy_model = ("enhancement.coder.", "enhancement.cond.")
    assert changed and all(k.startswith(entropy_model) for k in changed), sorted(changed)
    assert any(k.startswith("enhancement.coder.entropy_parameters.") for k in changed)


@pytest.mark.slow
@pytest.mark.server
def test_segmentation_enhancement_trains_and_evaluates_miou(runs, mlflow_server, monkeypatch,
                                                           tmp_path):
    monkeypatch.chdir(tmp_path)
    out = run_ok("train-enhancement", "--base-run", runs.base, "--target", "segmentation",
                 "--method", "conditional", *TINY)
    enhancement = run_id_from(out)
    c = client(mlflow_server.uri)
    trained = c.get_run(enhancement)
    assert trained.data.tags["target"] == "segmentation"
    assert trained.data.tags["base_run_id"] == runs.base
    assert {"ce_loss", "val_miou", "val_bpp_enh"} <= set(trained.data.metrics)

    evaluated = c.get_run(run_id_from(run_ok("evaluate", "--checkpoint", enhancement,
                                             "--max-images", "2")))
    metrics = evaluated.data.metrics
    assert {"miou", "map", "bpp", "bpp_base", "bpp_enh"} <= set(metrics)
    assert "psnr" not in metrics
    assert 0 <= metrics["miou"] <= 1
    assert metrics["bpp"] == pytest.approx(metrics["bpp_base"] + metrics["bpp_enh"], rel=1e-9)
    assert evaluated.data.tags["target"] == "segmentation"
    assert evaluated.data.tags["alpha"] == trained.data.tags["alpha"]  # compare labels points by it
