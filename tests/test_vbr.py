"""Variable-rate codecs (CompressAI's ``*-vbr``): training that samples the rate point, one
checkpoint evaluated at every rate into one RD curve that ``compare`` draws, and files that
carry their rate point in the header (``compress --rate``; decompress reads it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from taskcodec import bitstream
from taskcodec.cli.main import cli
from taskcodec.codecs import build_codec
from taskcodec.codecs.loading import LoadedCodec, load_codec
from taskcodec.codecs.single import rate_levels, vbr_lambdas
from taskcodec.config import VBR_CODEC_NAMES, VBR_LEVELS, EvalConfig, TrainConfig
from taskcodec.errors import BitstreamError, ConfigError

CODEC = "bmshj2018-hyperprior-vbr"
CONTEXT_CODEC = "mbt2018-vbr"  # autoregressive: decodes serially, so only where it must
# Trained λ of the fixture's run: not the default list, so the test sees it travel.
LAMBDAS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)
# Enough for bpp to grow with the rate point by a wide margin; quality (PSNR) is not yet
# ordered by rate after so few steps (it is not at 40 either), so it is not asserted.
STEPS = 16


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random picture, 1x3xHxW in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                           align_corners=False).clamp(0, 1)


def _train(tmp_path_factory, module_env, name: str) -> tuple[Path, dict]:
    """``best.pt`` of STEPS steps of a tiny variable-rate codec, and what its run logged: every
    step's sampled rate point and λ, and its tags."""
    from taskcodec.engine import train

    folder = tmp_path_factory.mktemp("vbr-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with module_env(f"sqlite:///{folder / 'mlflow.db'}", folder, "test-vbr"):
            run_id = train(TrainConfig.from_dict({
                "codec": name, "N": 16, "M": 16, "patch_size": 64, "batch_size": 4,
                "epochs": 1, "epoch_length": 4 * STEPS, "max_val_images": 1, "max_side": 128,
                "lr": 2e-3, "lr_scheduler": "none", "log_every": 1,
                "vbr_lambdas": ",".join(map(str, LAMBDAS)),
                "checkpoint_dir": str(folder / "ckpt")}))
            import mlflow

            client = mlflow.tracking.MlflowClient()
            history = {key: [m.value for m in sorted(client.get_metric_history(run_id, key),
                                                     key=lambda m: m.step)]
                       for key in ("vbr_rate", "vbr_lmbda")}
            tags = client.get_run(run_id).data.tags
    finally:
        torch.set_num_threads(threads)
    return folder / "ckpt" / "best.pt", {"history": history, "tags": tags}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_env) -> tuple[Path, dict]:
    return _train(tmp_path_factory, module_env, CODEC)


@pytest.fixture(scope="module")
def trained_context(tmp_path_factory, module_env) -> tuple[Path, dict]:
    """The same for the autoregressive mbt2018-vbr (its own store)."""
    return _train(tmp_path_factory, module_env, CONTEXT_CODEC)


@pytest.fixture(scope="module")
def codec(trained) -> LoadedCodec:
    return load_codec(str(trained[0]))


# --- the models and their settings -------------------------------------------------------------


def test_the_variable_rate_codecs_have_the_configs_rate_points_and_compressais_lambdas():
    for name in VBR_CODEC_NAMES:
        model = build_codec(name, N=8, M=8)
        assert rate_levels(model) == VBR_LEVELS
        assert vbr_lambdas(name) == list(model.lmbda)  # the constant is CompressAI's list
    assert rate_levels(build_codec("bmshj2018-hyperprior", N=8, M=8)) == 0
    assert vbr_lambdas(CODEC) == [0.0018, 0.0035, 0.0067, 0.0130, 0.025, 0.0483, 0.0932, 0.18]
    assert vbr_lambdas("mbt2018-mean") == []


@pytest.mark.parametrize(("settings", "message"), [
    ({"codec": CODEC, "vbr_lambdas": "0.1,0.2"}, "must be 8 increasing numbers > 0"),
    ({"codec": CODEC, "vbr_lambdas": "1,2,3,4,5,6,8,7"}, "must be 8 increasing numbers > 0"),
    ({"codec": CODEC, "vbr_lambdas": "a,b"}, "vbr_lambdas='a,b' is not a comma-separated list"),
    ({"codec": "mbt2018-mean", "vbr_lambdas": "1,2,3,4,5,6,7,8"},
     "vbr_lambdas is for the variable-rate codecs"),
])
def test_bad_vbr_lambdas_are_one_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(settings)


@pytest.mark.parametrize(("rate", "message"), [
    ("x", "rate='x' is not 'all' or comma-separated rate points"),
    ("1,1", "rate='1,1' must list distinct rate points >= 0"),
    ("-1", "rate='-1' must list distinct rate points >= 0"),
])
def test_bad_evaluate_rates_are_one_config_error(rate, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig.from_dict({"checkpoint": "x.pt", "rate": rate})


# --- training samples the rate point -----------------------------------------------------------


def test_training_samples_rate_points_and_weighs_each_by_its_lambda(trained):
    history = trained[1]["history"]
    rates = [int(r) for r in history["vbr_rate"]]
    assert len(rates) == STEPS and set(rates) <= set(range(VBR_LEVELS))
    assert len(set(rates)) >= 4  # sampled, not one fixed point
    assert history["vbr_lmbda"] == pytest.approx([LAMBDAS[r] for r in rates])
    assert trained[1]["tags"]["vbr_lambdas"] == ",".join(f"{v:g}" for v in LAMBDAS)


# --- one checkpoint, one RD curve ---------------------------------------------------------------


@pytest.mark.parametrize("name", [CODEC, CONTEXT_CODEC])
def test_one_checkpoint_gives_a_monotone_rd_curve_that_compare_draws_as_one_curve(name, request,
                                                                                   tmp_path):
    from taskcodec.compare.comparison import CompareOptions, compare
    from taskcodec.evaluate import evaluate

    trained = request.getfixturevalue("trained" if name == CODEC else "trained_context")
    side = 128 if name == CODEC else 64  # the context model decodes serially
    result = evaluate(EvalConfig.from_dict({
        "checkpoint": str(trained[0]), "max_images": 1, "max_side": side, "jpeg": False}))
    points = result["rates"]
    assert [p["rate"] for p in points] == list(range(VBR_LEVELS))
    assert len({p["run_id"] for p in points}) == VBR_LEVELS  # one evaluate run per rate
    bpp = [p["summary"]["bpp"] for p in points]
    estimated = [p["summary"]["bpp_estimated"] for p in points]
    assert all(a <= b for a, b in zip(bpp, bpp[1:])) and bpp[-1] > bpp[0], bpp
    assert all(a <= b for a, b in zip(estimated, estimated[1:])), estimated
    assert estimated[-1] > 2 * estimated[0], estimated
    if name == CODEC:  # at the context model's 64 px, the header is most of the bytes
        assert bpp[-1] > 2 * bpp[0], bpp
    # Real bytes agree with what the likelihoods promise: they differ by the header (about
    # 0.06 bpp here) and, either way, by the coder's scale table and its bypass-coded tails,
    # which a model trained for 16 steps still visits (some 15 % at the highest rate).
    slack = 0.1 * (128 / side) ** 2  # the header's share grows as the image shrinks
    for real, promised in zip(bpp, estimated):
        assert abs(real - promised) < slack + 0.25 * promised, (bpp, estimated)

    comparison = compare(CompareOptions(output_dir=tmp_path / "cmp"))
    (curve,) = comparison.curves
    assert curve.name == name and len(curve.points) == VBR_LEVELS
    by_lambda = sorted(curve.points, key=lambda p: p.lagrange)
    assert [p.lagrange for p in by_lambda] == pytest.approx(list(LAMBDAS))
    assert [p.bpp for p in by_lambda] == pytest.approx(bpp)
    if name != CODEC:
        return  # what follows is evaluate's, not the codec's

    # Under a run of the caller's (or of `mlflow run`), the rate points are its child runs.
    import mlflow

    from taskcodec import tracking

    with tracking.start_run("parent") as parent:
        nested = evaluate(EvalConfig.from_dict({
            "checkpoint": str(trained[0]), "rate": "0,7", "max_images": 1, "max_side": 64,
            "jpeg": False}))
        assert mlflow.active_run().info.run_id == parent.info.run_id  # still the caller's
    client = mlflow.tracking.MlflowClient()
    children = [client.get_run(p["run_id"]) for p in nested["rates"]]
    assert [c.data.tags.get("mlflow.parentRunId") for c in children] == [parent.info.run_id] * 2
    assert [c.data.params["rate"] for c in children] == ["0", "7"]
    assert [float(c.data.params["lmbda"]) for c in children] == [LAMBDAS[0], LAMBDAS[7]]


def test_evaluate_takes_the_asked_rate_points_and_refuses_one_outside_the_range(trained, codec):
    from taskcodec.evaluate import rate_points

    def ask(rate: str) -> list:
        return rate_points(EvalConfig.from_dict({"checkpoint": str(trained[0]), "rate": rate}),
                           codec)

    assert ask("all") == list(range(VBR_LEVELS)) and ask("5,1") == [5, 1]
    with pytest.raises(ConfigError, match=f"rate 8 is outside {CODEC}'s range 0..7"):
        ask("2,8")
    with pytest.raises(ConfigError, match="rate 3 given, but bmshj2018-hyperprior has a fixed"):
        rate_points(EvalConfig.from_dict({"checkpoint": "x", "rate": "3"}),
                    _untrained("bmshj2018-hyperprior"))


# --- files carry their rate point ---------------------------------------------------------------


def _native(codec: LoadedCodec):
    """The same weights in CompressAI's own class, coding with its own (native) coder."""
    from compressai.zoo.image_vbr import model_architectures

    model = model_architectures[codec.name](N=int(codec.model_args["N"]),
                                            M=int(codec.model_args["M"]))
    model.load_state_dict(codec.model.state_dict())
    context = getattr(model, "context_prediction", None)
    if context is not None:  # CompressAI's mbt2018-vbr decoder reads the raw kernel
        context.weight.data *= context.mask
    model.update(force=True)
    return model.eval()


def _untrained(name: str) -> LoadedCodec:
    torch.manual_seed(0)
    model = build_codec(name, N=8, M=8).eval()
    model.update(force=True)
    return LoadedCodec(name=name, kind="codec", model=model, fingerprint="0123456789abcdef",
                       config={}, model_args={"kind": "codec", "codec": name, "N": 8, "M": 8},
                       source="test")


@pytest.mark.parametrize("name", VBR_CODEC_NAMES)
def test_each_rate_round_trips_bit_exact_with_compressais_own_coding(codec, name):
    loaded = codec if name == CODEC else _untrained(name)
    native = _native(loaded)
    x = image(64, 64)
    sizes = []
    for rate in (0, 3, 7):
        data = loaded.compress(x, rate)
        header, layers = bitstream.unpack(data)
        assert (data[4], header.rate) == (bitstream.RATE_VERSION, rate)
        with torch.no_grad():
            own = native.compress(x, s=rate)
            expected = native.decompress(own["strings"], own["shape"], s=rate)["x_hat"]
        assert layers[0].strings == tuple(s[0] for s in own["strings"])
        assert torch.equal(loaded.decompress(data)["x_hat"], expected)  # rate from the header
        sizes.append(len(data))
    if loaded is codec:  # trained: a higher rate point spends more bytes
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1], sizes
    assert loaded.compress(x) == loaded.compress(x, VBR_LEVELS - 1)  # the default: the highest


def test_rates_outside_the_range_and_files_without_one_are_one_line_errors(codec):
    x = image(64, 64)
    with pytest.raises(ConfigError, match=f"rate 8 is outside {CODEC}'s range 0..7"):
        codec.compress(x, 8)
    header, layers = bitstream.unpack(codec.compress(x, 2))
    forged = bitstream.pack(bitstream.Header(header.codec, header.checkpoint_id, header.height,
                                             header.width, 12), layers)
    with pytest.raises(BitstreamError, match=f"rate 12 is outside {CODEC}'s range 0..7"):
        codec.decompress(forged)
    no_rate = bitstream.pack(bitstream.Header(header.codec, header.checkpoint_id, header.height,
                                              header.width), layers)
    assert no_rate[4] == bitstream.FORMAT_VERSION  # what a fixed-rate codec writes
    with pytest.raises(BitstreamError, match=f"{CODEC} is a variable-rate codec: it needs a rate "
                                             "point from 0 to 7"):
        codec.decompress(no_rate)
    fixed = _untrained("bmshj2018-hyperprior")
    with pytest.raises(ConfigError, match="rate 3 given, but bmshj2018-hyperprior has a fixed"):
        fixed.compress(x, 3)
    assert fixed.compress(x)[4] == bitstream.FORMAT_VERSION


def test_header_rate_field_is_version_3_and_older_versions_are_unchanged():
    layer = bitstream.Layer("main", (b"yy", b"z"), (1, 1), b"\x01\x02\x03\x04")
    plain = bitstream.Header("c", "0123456789abcdef", 5, 7)
    assert bitstream.pack(plain, [layer])[4] == 2
    for rate in (0, 5, 300):
        header = bitstream.Header("c", "0123456789abcdef", 5, 7, rate)
        data = bitstream.pack(header, [layer])
        assert data[4] == 3 and bitstream.unpack(data) == (header, [layer])
    # Version 3 also says "no rate" (0), should a writer ask for it.
    assert bitstream.unpack(bitstream.pack(plain, [layer], version=3)) == (plain, [layer])
    with pytest.raises(ValueError, match="format version 1 cannot store a rate"):
        bitstream.pack(bitstream.Header("c", "0123456789abcdef", 5, 7, 1), [layer], version=1)
    with pytest.raises(ValueError, match="rate must be a non-negative int or None, got -1"):
        bitstream.Header("c", "0123456789abcdef", 5, 7, -1)


def test_cli_compress_rate_and_decompress_reading_it(trained, codec, tmp_path):
    from PIL import Image

    x = image(64, 64)
    png = tmp_path / "in.png"
    Image.fromarray(x[0].mul(255).round().byte().permute(1, 2, 0).numpy()).save(png)
    ckpt = str(trained[0])
    out = CliRunner().invoke(cli, ["compress", str(png), "-o", str(tmp_path / "a.tcd"), "-c", ckpt,
                                   "--rate", "2"])
    assert out.exit_code == 0, out.output
    assert f"{CODEC} {codec.fingerprint}, rate 2)" in out.stderr
    back = CliRunner().invoke(cli, ["decompress", str(tmp_path / "a.tcd"), "-o",
                                    str(tmp_path / "a.png"), "-c", ckpt])
    assert back.exit_code == 0, back.output
    data = (tmp_path / "a.tcd").read_bytes()
    assert bitstream.unpack(data)[0].rate == 2
    expected = codec.decompress(data)["x_hat"][0].mul(255).round().byte()
    with Image.open(tmp_path / "a.png") as img:
        assert torch.equal(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), expected)
    bad = CliRunner().invoke(cli, ["compress", str(png), "-o", str(tmp_path / "b.tcd"), "-c", ckpt,
                                   "--rate", "9"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines()[-1] == f"Error: rate 9 is outside {CODEC}'s range 0..7"
    assert not (tmp_path / "b.tcd").exists()
