"""Speed switches (compile, channels_last, autocast), the short-cpu recipe preset, the
warm-up schedule (the real-bitstream RD point logged while training is tested in
test_train.py, whose tracking stores start migrated; the switches in the launchers' rendered
commands in test_launch.py).

Everything runs in this process on tiny codecs (N=M=8). torch.compile is exercised once, with
the ``aot_eager`` backend (the graph capture and autograd tracing that can change results; the
inductor backend's C++ build takes minutes on 2 cores and is measured by ``make bench``).
"""

from __future__ import annotations

import pytest
import torch

from taskcodec.config import SHORT_CPU, TrainConfig


def tiny_codec(codec: str = "bmshj2018-factorized"):
    from taskcodec.codecs import build_codec

    torch.manual_seed(0)
    return build_codec(codec, N=8, M=8)


@pytest.mark.compile
def test_compiled_and_eager_models_give_the_same_outputs_and_gradients(monkeypatch):
    """The suite's one torch.compile (tracing is what costs on a CPU; keep it the only one):
    the training forward of a tiny codec compiled by speed.compile_module, as the engine
    compiles it, against the same model run eagerly: outputs, rate and gradients."""
    from torch._dynamo.utils import counters

    from taskcodec import speed
    from taskcodec.losses import RateDistortionLoss

    monkeypatch.setenv("TASKCODEC_COMPILE_BACKEND", "aot_eager")
    model = tiny_codec().train()
    x = torch.rand(2, 3, 32, 32)
    criterion = RateDistortionLoss(lmbda=0.01)
    graphs = counters["stats"]["unique_graphs"]
    results = []
    for net in (model, speed.compile_module(model)):
        torch.manual_seed(1)  # the same quantization noise on both sides
        model.zero_grad(set_to_none=True)
        out = net(x)
        losses = criterion(out, x)
        losses["loss"].backward()
        grad = model.g_a[0].weight.grad.clone()
        results.append((out["x_hat"].detach(), losses["bpp_loss"].detach(), grad))
    assert counters["stats"]["unique_graphs"] > graphs  # traced, not an eager fallback
    (eager_x, eager_bpp, eager_grad), (comp_x, comp_bpp, comp_grad) = results
    torch.testing.assert_close(comp_x, eager_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(comp_bpp, eager_bpp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(comp_grad, eager_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("codec", ["bmshj2018-factorized", "mbt2018-mean"])
def test_bf16_autocast_keeps_the_rate_of_fp32(codec):
    from taskcodec import speed
    from taskcodec.metrics import bpp_from_likelihoods

    model = tiny_codec(codec).eval()
    x = torch.rand(1, 3, 64, 64)
    cpu = torch.device("cpu")
    with torch.no_grad():
        reference = float(bpp_from_likelihoods(model(x)["likelihoods"], 64 * 64))
        speed.keep_entropy_models_fp32(model)
        with speed.autocast("bf16", cpu):
            out = model(x)
            assert out["x_hat"].dtype == torch.bfloat16  # the transforms did run in bf16
            bpp = float(bpp_from_likelihoods(out["likelihoods"], 64 * 64))
    assert all(v.dtype == torch.float32 for v in out["likelihoods"].values())
    assert bpp == pytest.approx(reference, rel=0.02)


def test_entropy_model_arithmetic_stays_fp32_under_autocast():
    """The same latent, given in bf16 inside autocast, gets exactly the fp32 likelihoods;
    without speed.keep_entropy_models_fp32 the entropy model computes in bf16."""
    from taskcodec import speed

    cpu = torch.device("cpu")
    torch.manual_seed(2)
    y = (torch.randn(1, 8, 4, 4) * 3).bfloat16()  # exactly representable in both dtypes
    scales = (torch.rand(1, 8, 4, 4) + 0.2).bfloat16()
    guarded, plain = tiny_codec("mbt2018-mean").eval(), tiny_codec("mbt2018-mean").eval()
    speed.keep_entropy_models_fp32(guarded)
    with torch.no_grad():
        reference = (guarded.entropy_bottleneck(y.float())[1],
                     guarded.gaussian_conditional(y.float(), scales.float())[1])
        with speed.autocast("bf16", cpu):
            kept = (guarded.entropy_bottleneck(y)[1], guarded.gaussian_conditional(y, scales)[1])
            lost = plain.entropy_bottleneck(y)[1]
    for likelihoods, expected in zip(kept, reference):
        assert likelihoods.dtype == torch.float32
        assert torch.equal(likelihoods, expected)
    assert lost.dtype != torch.float32 or not torch.equal(lost, reference[0])


def test_channels_last_batches_and_precision_choices():
    from taskcodec import speed

    batch = speed.channels_last((torch.rand(2, 3, 8, 8), torch.rand(2, 5), "name"))
    assert batch[0].is_contiguous(memory_format=torch.channels_last)
    assert batch[1].shape == (2, 5) and batch[2] == "name"
    cpu = torch.device("cpu")
    assert speed.resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="precision=fp16 needs a CUDA device"):
        speed.resolve_precision("fp16", cpu)
    assert not speed.use_compile("auto", cpu, planned_steps=100, planned_minutes=10)
    assert speed.use_compile("auto", torch.device("cuda"), 1, 0)
    assert not speed.use_compile("false", torch.device("cuda"), 10**6, 600)
    before = torch.backends.cuda.matmul.allow_tf32
    speed.set_tf32(not before, cpu)  # TF32 is a GPU setting: nothing changes on a CPU
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_recipe_preset_sits_beneath_explicit_settings():
    preset = TrainConfig.from_dict({"recipe": "short-cpu"})
    assert {k: getattr(preset, k) for k in SHORT_CPU} == SHORT_CPU
    explicit = TrainConfig.from_dict({"recipe": "short-cpu", "lr": "1e-4", "patch_size": 256})
    assert (explicit.lr, explicit.patch_size, explicit.batch_size) == (1e-4, 256, 8)
    # A stored config (a checkpoint's, a resumed run's) comes back exactly as it was.
    assert TrainConfig.from_dict(explicit.to_dict()) == explicit
    assert explicit.to_params()["recipe"] == "short-cpu"
    assert TrainConfig.from_dict({}).lr == 1e-4  # no preset: the CompressAI defaults
    with pytest.raises(Exception, match="recipe='fast' is not one of"):
        TrainConfig.from_dict({"recipe": "fast"})


def test_recipe_through_the_cli_survives_mlprojects_default_parameters():
    from taskcodec.cli.options import build_config

    # `mlflow run -e train -P recipe=short-cpu` passes MLProject's defaults too (as floats).
    config = build_config(TrainConfig, {"recipe": "short-cpu", "lr": "0.0001",
                                        "batch_size": "8.0", "patch_size": "256.0",
                                        "lmbda": "0.05", "N": None})
    assert (config.lr, config.patch_size, config.lmbda, config.N) == (SHORT_CPU["lr"], 128, 0.05, 128)
    assert build_config(TrainConfig, {"recipe": "short-cpu", "lr": "2e-4"}).lr == 2e-4


def test_warmup_cosine_rises_then_decays_to_a_tenth():
    from taskcodec.engine import _warmup_cosine

    config = TrainConfig.from_dict({"lr_scheduler": "warmup-cosine", "warmup_steps": 4})
    assert [_warmup_cosine(config, s, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert _warmup_cosine(config, 10, 0.5) == pytest.approx(0.55)
    assert _warmup_cosine(config, 10, 1.0) == pytest.approx(0.1)
    assert _warmup_cosine(config, 10, 3.0) == pytest.approx(0.1)  # past the budget: the floor


def test_switch_benchmark_sides_are_valid_train_settings():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import speed as bench

    for switches in bench.SWITCHES.values():
        config = TrainConfig.from_dict({**bench.OFF, **switches})
        assert {k: getattr(config, k) for k in switches} == switches


def test_max_minutes_ends_the_budget_inside_an_epoch():
    from taskcodec.engine import TrainState, _budget_used

    config = TrainConfig.from_dict({"max_minutes": 1.5})
    assert _budget_used(config, TrainState(seconds=89.0), steps_only=True) == ""
    assert _budget_used(config, TrainState(seconds=90.0), steps_only=True) == (
        "1.5 minutes of max_minutes=1.5")


def test_cheng2020_trains_in_the_default_layout_whatever_channels_last_says(caplog):
    from taskcodec import speed
    from taskcodec.config import TrainConfig

    cheng = TrainConfig(codec="cheng2020-anchor", N=8, M=8, channels_last=True)
    assert speed.channels_last_for(cheng) is False
    assert "channels_last is off for codec=cheng2020-anchor" in caplog.text
    assert speed.channels_last_for(TrainConfig(codec="mbt2018", channels_last=True)) is True
    assert speed.channels_last_for(TrainConfig(codec="mbt2018", channels_last=False)) is False
