"""Every registered codec: the CompressAI contract of ``forward``, and a real compress ->
bytes -> decompress round trip through :class:`LoadedCodec`, built from checkpoints that a
real (tiny) training run wrote; plus the registry's refusals."""

from __future__ import annotations

import pytest
import torch

from taskcodec.codecs import CODECS, build_codec
from taskcodec.codecs.loading import load_codec
from taskcodec.config import CODEC_NAMES, TrainConfig
from taskcodec.errors import BitstreamError, CheckpointError, ConfigError
from taskcodec.registry import Registry

N, M = 8, 12
HYPERPRIORS = {"bmshj2018-hyperprior", "mbt2018-mean", "bmshj2018-hyperprior-vbr",
               "mbt2018-mean-vbr"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_env) -> dict:
    """``best.pt`` of a two-step training run per codec (one sqlite store for all)."""
    from taskcodec.engine import train

    folder = tmp_path_factory.mktemp("codec-runs")
    with module_env(f"sqlite:///{folder / 'mlflow.db'}", folder, "test-codecs"):
        for name in CODECS:
            train(TrainConfig.from_dict({
                "codec": name, "N": N, "M": M, "patch_size": 64, "batch_size": 2, "epochs": 1,
                "epoch_length": 4, "max_val_images": 1, "max_side": 128,
                "checkpoint_dir": str(folder / name)}))
    return {name: folder / name / "best.pt" for name in CODECS}


@pytest.fixture(scope="module")
def loaded(trained) -> dict:
    """The trained codecs, loaded once (building the entropy tables takes a moment)."""
    return {name: load_codec(str(path)) for name, path in trained.items()}


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random picture (noise would be incompressible), 1x3xHxW in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                           align_corners=False).clamp(0, 1)


# --- the registry ----------------------------------------------------------------------------


def test_registry_holds_the_compressai_codecs_and_the_config_offers_exactly_those():
    assert tuple(CODECS) == ("bmshj2018-factorized", "bmshj2018-hyperprior",
                             "bmshj2018-hyperprior-vbr", "mbt2018-mean", "mbt2018-mean-vbr")
    assert set(CODEC_NAMES) == set(CODECS)
    codec_field = next(f for f in TrainConfig.fields() if f.name == "codec")
    assert set(codec_field.metadata["choices"]) == set(CODECS)


def test_registry_refuses_a_duplicate_name_and_keeps_the_first_builder():
    registry: Registry[str] = Registry("widget")
    registry.register("a")(lambda: "first")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(lambda: "second")
    assert registry.build("a") == "first"
    assert len(registry) == 1 and "a" in registry
    with pytest.raises(ValueError, match="codec 'mbt2018-mean' is already registered"):
        CODECS.register("mbt2018-mean")(lambda **kw: None)


def test_unknown_codec_names_the_known_ones():
    with pytest.raises(ConfigError) as err:
        build_codec("bmshj2018", N=N, M=M)
    assert str(err.value) == ("unknown codec 'bmshj2018' (known: bmshj2018-factorized, "
                              "bmshj2018-hyperprior, bmshj2018-hyperprior-vbr, mbt2018-mean, "
                              "mbt2018-mean-vbr)")


@pytest.mark.parametrize(("n", "m", "bad"), [(0, 8, 'N "0"'), (8, -1, 'M "-1"'), (8.0, 8, 'N "8.0"')])
def test_build_codec_refuses_bad_sizes(n, m, bad):
    with pytest.raises(ConfigError, match=f'Invalid {bad} for codec mbt2018-mean, should be >= 1'):
        build_codec("mbt2018-mean", N=n, M=m)


# --- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
def test_forward_returns_x_hat_and_likelihoods_of_the_documented_shapes(name):
    torch.manual_seed(0)
    model = build_codec(name, N=N, M=M)
    x = image(64, 128)
    out = model(x)
    assert set(out) == {"x_hat", "likelihoods"}
    assert out["x_hat"].shape == x.shape
    expected = {"y": (1, M, 4, 8)}
    if name in HYPERPRIORS:
        expected["z"] = (1, N, 1, 2)
    assert {k: tuple(v.shape) for k, v in out["likelihoods"].items()} == expected
    for v in out["likelihoods"].values():
        assert bool(((v > 0) & (v <= 1)).all())
    assert all(p.grad is None for p in model.parameters())
    out["x_hat"].mean().backward()  # trainable end to end
    assert model.g_a[0].weight.grad is not None


# --- real bitstreams from trained checkpoints --------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize(("height", "width"), [(50, 70), (64, 64), (17, 129)])
def test_compress_decompress_round_trip_keeps_the_image_size(loaded, name, height, width):
    codec = loaded[name]
    assert (codec.name, codec.kind) == (name, "codec")
    assert codec.config["N"] == N and codec.config["M"] == M
    x = image(height, width, seed=height)
    data = codec.compress(x)
    assert data[:4] == b"TCDC"
    assert codec.compress(x[0]) == data  # 3xHxW works too; coding is deterministic
    x_hat = codec.decompress(data)["x_hat"]
    assert x_hat.shape == (1, 3, height, width)
    assert float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1
    # The decoder reproduces what the model reconstructs from the quantized latent.
    from taskcodec.data.transforms import crop_padding, pad_to_multiple

    padded, pads = pad_to_multiple(x, 64)
    with torch.no_grad():
        rate = codec.rate_kwargs(codec.default_rate)  # a variable-rate codec's default rate
        expected = crop_padding(codec.model(padded, **rate)["x_hat"], pads).clamp(0, 1)
    assert torch.allclose(x_hat, expected, atol=1e-4)


def test_trained_checkpoints_carry_the_engine_format(trained, loaded):
    ckpt = torch.load(trained["mbt2018-mean"], map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "aux_optimizer", "config", "fingerprint", "step", "epoch",
            "run_id"} <= set(ckpt)
    assert ckpt["config"]["codec"] == "mbt2018-mean" and ckpt["step"] == 2
    assert loaded["mbt2018-mean"].fingerprint == ckpt["fingerprint"]


def test_a_file_from_another_checkpoint_is_refused(loaded):
    hyper, mean = loaded["bmshj2018-hyperprior"], loaded["mbt2018-mean"]
    assert hyper.fingerprint != mean.fingerprint
    data = mean.compress(image(50, 70))
    with pytest.raises(BitstreamError, match=mean.fingerprint):
        hyper.decompress(data)


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(trained, tmp_path):
    from taskcodec.checkpoints import save_atomic

    ckpt = torch.load(trained["bmshj2018-factorized"], map_location="cpu", weights_only=True)
    ckpt["config"]["N"] = 2 * N
    ckpt.get("model_args", {})["N"] = 2 * N
    path = save_atomic(ckpt, tmp_path / "liar.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} does not match its model"):
        load_codec(str(path))
