"""Every registered codec: the CompressAI contract of ``forward``, and a real compress ->
bytes -> decompress round trip through :class:`LoadedCodec`, built from checkpoints that a
real (tiny) training run wrote; plus the registry's refusals, and the entropy coder's guard
against latents that CompressAI's native encoder would code forever."""

from __future__ import annotations

import pytest
import torch

from taskcodec import bitstream
from taskcodec.codecs import CODECS, build_codec
from taskcodec.codecs.loading import LoadedCodec, layer_layout, load_codec
from taskcodec.config import CODEC_NAMES, N_ONLY_CODECS, TrainConfig
from taskcodec.errors import BitstreamError, CheckpointError, ConfigError, EncodeError
from taskcodec.registry import Registry

N, M = 8, 12
HYPERPRIORS = {"bmshj2018-hyperprior", "mbt2018-mean", "bmshj2018-hyperprior-vbr",
               "mbt2018-mean-vbr"}
FACTORIZED = {"bmshj2018-factorized", "bmshj2018-factorized-relu"}
AUTOREGRESSIVE = {"mbt2018", "cheng2020-anchor", "cheng2020-attn", "mbt2018-vbr"}


def latent_channels(name: str) -> int:
    """M of the test codecs; the cheng2020 models' latent has N channels (they have no M)."""
    return N if name in N_ONLY_CODECS else M


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_env) -> dict:
    """``best.pt`` of a two-step training run per codec (one sqlite store for all)."""
    from taskcodec.engine import train

    folder = tmp_path_factory.mktemp("codec-runs")
    with module_env(f"sqlite:///{folder / 'mlflow.db'}", folder, "test-codecs"):
        for name in CODECS:
            train(TrainConfig.from_dict({
                "codec": name, "N": N, "M": latent_channels(name), "patch_size": 64,
                "batch_size": 2, "epochs": 1, "epoch_length": 4, "max_val_images": 1,
                "max_side": 128, "checkpoint_dir": str(folder / name),
                # torch 2.14.1 corrupts the heap in cheng2020's backward under channels_last
                # (a hang or "double free" within a few steps): not yet solved, see the report.
                "channels_last": name not in N_ONLY_CODECS}))
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


def test_registry_holds_the_compressai_zoo_and_the_config_offers_exactly_those():
    assert tuple(CODECS) == ("bmshj2018-factorized", "bmshj2018-factorized-relu",
                             "bmshj2018-hyperprior", "bmshj2018-hyperprior-vbr",
                             "cheng2020-anchor", "cheng2020-attn", "mbt2018", "mbt2018-mean",
                             "mbt2018-mean-vbr", "mbt2018-vbr")
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
                              "bmshj2018-factorized-relu, bmshj2018-hyperprior, "
                              "bmshj2018-hyperprior-vbr, cheng2020-anchor, cheng2020-attn, "
                              "mbt2018, mbt2018-mean, mbt2018-mean-vbr, mbt2018-vbr)")


@pytest.mark.parametrize(("n", "m", "bad"), [(0, 8, 'N "0"'), (8, -1, 'M "-1"'), (8.0, 8, 'N "8.0"')])
def test_build_codec_refuses_bad_sizes(n, m, bad):
    with pytest.raises(ConfigError, match=f'Invalid {bad} for codec mbt2018-mean, should be >= 1'):
        build_codec("mbt2018-mean", N=n, M=m)


def test_each_codec_takes_its_own_size_parameters_and_help_names_them():
    from click.testing import CliRunner

    from taskcodec.cli.main import cli

    # cheng2020: N alone (M left at its default, or equal to N); the factorized priors
    # downsample by 16 only, so their crops need not be multiples of 64.
    assert TrainConfig.from_dict({"codec": "cheng2020-anchor", "N": 64}).N == 64
    TrainConfig.from_dict({"codec": "cheng2020-attn", "N": 64, "M": 64})
    with pytest.raises(ConfigError, match=r"^M=96 is not a size of codec=cheng2020-anchor: its "
                                          r"latent has N=64 channels \(leave M out"):
        TrainConfig.from_dict({"codec": "cheng2020-anchor", "N": 64, "M": 96})
    TrainConfig.from_dict({"codec": "bmshj2018-factorized-relu", "patch_size": 48})
    with pytest.raises(ConfigError, match=r"^patch_size=48 must be a multiple of 64 for "
                                          r"codec=mbt2018 "):
        TrainConfig.from_dict({"codec": "mbt2018", "patch_size": 48})
    help_text = "".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert "sizedbyNandM(cheng2020-*:Nalone)" in help_text  # wrapped at any space or hyphen
    assert "mbt2018(-vbr)andcheng2020-*decodeserially" in help_text


# --- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
def test_forward_returns_x_hat_and_likelihoods_of_the_documented_shapes(name):
    torch.manual_seed(0)
    model = build_codec(name, N=N, M=M)
    x = image(64, 128)
    out = model(x)
    assert set(out) == {"x_hat", "likelihoods"}
    assert out["x_hat"].shape == x.shape
    expected = {"y": (1, latent_channels(name), 4, 8)}
    if name not in FACTORIZED:
        expected["z"] = (1, N, 1, 2)
    assert {k: tuple(v.shape) for k, v in out["likelihoods"].items()} == expected
    for v in out["likelihoods"].values():
        assert bool(((v > 0) & (v <= 1)).all())
    assert all(p.grad is None for p in model.parameters())
    out["x_hat"].mean().backward()  # trainable end to end
    assert next(model.g_a.parameters()).grad is not None


# --- real bitstreams from trained checkpoints --------------------------------------------------


def compressai_decode(codec: LoadedCodec, data: bytes) -> torch.Tensor:
    """CompressAI's own (native, serial) decoding of a file's strings, by its own class."""
    from compressai.zoo import image, image_vbr

    architectures = {**image.model_architectures, **image_vbr.model_architectures}
    reference = architectures[codec.name].from_state_dict(codec.model.state_dict()).eval()
    # CompressAI's mbt2018-vbr decoder reads the raw context kernel, its encoder the masked one
    context = reference.context_prediction
    context.weight.data *= context.mask
    header, (layer,) = bitstream.unpack(data)
    with torch.no_grad():
        return reference.decompress(**layer.to_compressed(),
                                    **codec.rate_kwargs(header.rate))["x_hat"]


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize(("height", "width"), [(50, 70), (64, 64), (17, 129)])
def test_compress_decompress_round_trip_keeps_the_image_size(loaded, name, height, width):
    from taskcodec.data.transforms import crop_padding, pad_to_multiple

    codec = loaded[name]
    assert (codec.name, codec.kind) == (name, "codec")
    assert codec.config["N"] == N and codec.config["M"] == latent_channels(name)
    x = image(height, width, seed=height)
    data = codec.compress(x)
    assert data[:4] == b"TCDC"
    assert codec.compress(x[0]) == data  # 3xHxW works too; coding is deterministic
    padded, pads = pad_to_multiple(x, 64)
    _, (layer,) = bitstream.unpack(data)
    assert layer_layout(codec.model, *padded.shape[-2:]) == (len(layer.strings), layer.shape)
    stride = 16 if name in FACTORIZED else 64
    assert layer.shape == (padded.shape[-2] // stride, padded.shape[-1] // stride)
    x_hat = codec.decompress(data)["x_hat"]
    assert x_hat.shape == (1, 3, height, width)
    assert float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1
    if name in AUTOREGRESSIVE:
        # forward() rounds y without the context's means, so it is no reference here:
        # CompressAI's own decoder of the same strings is, to the last bit.
        assert torch.equal(x_hat, crop_padding(compressai_decode(codec, data), pads))
        return
    # The decoder reproduces what the model reconstructs from the quantized latent.
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


def test_a_context_models_damaged_y_string_is_refused_by_the_safe_decoder(loaded):
    # CompressAI's native decode_stream would read past the end of these strings.
    codec = loaded["mbt2018"]
    header, (layer,) = bitstream.unpack(codec.compress(image(64, 64)))
    y, z = layer.strings
    for bad_y in (y[:-4], y + bytes(4), bytes(len(y)), y[4:] + y[:4]):
        mutant = bitstream.pack(header, [bitstream.Layer(layer.name, (bad_y, z), layer.shape,
                                                         layer.digest)])
        with pytest.raises(BitstreamError, match="does not decode|other symbols"):
            codec.decompress(mutant)


# --- the native encoder's range ----------------------------------------------------------------


@pytest.mark.timeout(60, method="thread")  # a regression hangs in native code: fail, not wait
def test_symbols_the_native_encoder_would_code_forever_are_refused_and_the_edge_ones_coded():
    from taskcodec.codecs.entropy import MAX_OUTLIER, CodingSession, SafeEntropyCoder, rans_decode

    coder = SafeEntropyCoder(CodingSession(), "gaussian_conditional")
    # One table of two values (symbols -1 and 0 with offset -1): 0 is its top, the bypass flag.
    tables = ([[0, 1 << 15, 1 << 16]], [3], [-1])
    edge = [-1, 0, -MAX_OUTLIER - 1, MAX_OUTLIER - 1]  # 2^27 below the table, 2^27 - 1 above
    string = coder.encode_with_indexes(edge, [0] * 4, *tables)
    assert rans_decode(string, [0] * 4, *tables) == edge
    for bad in (-MAX_OUTLIER - 2, MAX_OUTLIER, -(2**31), 2**31 - 1):
        with pytest.raises(EncodeError, match=rf"^cannot entropy-code this image: symbol {bad} of "
                                              r"gaussian_conditional \(1 such\) lies over 2\^27 "
                                              r"outside its table"):
            coder.encode_with_indexes([0, bad, -1], [0] * 3, *tables)


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize(("name", "where"), [("bmshj2018-factorized", "entropy_bottleneck"),
                                             ("mbt2018-mean", "gaussian_conditional"),
                                             ("mbt2018", "gaussian_conditional")])
def test_a_codec_whose_latent_diverged_is_refused_in_one_line(name, where):
    """Weights that blow the latent up (random, diverged or corrupt: a `train --init-from` of
    random weights hung here for good) are one EncodeError, not a process that never ends."""
    torch.manual_seed(0)
    model = build_codec(name, N=8, M=8).eval()
    with torch.no_grad():
        if name in FACTORIZED:
            model.g_a[0].weight.fill_(float("nan"))  # NaN symbols become -2^31
        else:
            model.h_s[-1].bias.fill_(1e12)  # means of 1e12: symbols beyond int32 (-2^31)
    model.update(force=True)
    codec = LoadedCodec(name=name, kind="codec", model=model, fingerprint="0" * 16, config={},
                        model_args={"kind": "codec", "codec": name, "N": 8, "M": 8},
                        source="test")
    with pytest.raises(EncodeError) as err:
        codec.compress(image(64, 64))
    assert str(err.value).startswith("cannot entropy-code this image: ")
    assert f" of {where} (" in str(err.value) and "\n" not in str(err.value)
