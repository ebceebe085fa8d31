import io
import math

import pytest
import torch
from PIL import Image
from pytorch_msssim import ms_ssim as reference_ms_ssim

from taskcodec import metrics
from taskcodec.baselines import jpeg_at_bpp, jpeg_curve
from taskcodec.metrics import (
    MAX_DB,
    bpp_from_bytes,
    bpp_from_likelihoods,
    bpp_per_likelihood,
    ms_ssim,
    ms_ssim_db,
    ms_ssim_levels,
    ms_ssim_per_image,
    psnr,
    psnr_per_image,
)


def _image(size: int, seed: int = 0) -> torch.Tensor:
    """A [3, size, size] image with smooth gradients, edges and fine texture, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    disc = ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08).float()
    base = torch.stack([0.3 + 0.5 * xx, 0.6 * yy + 0.3 * disc, 0.5 + 0.3 * torch.sin(8 * xx * yy)])
    noise = 0.15 * torch.rand(3, size, size, generator=g)
    return (base + noise).clamp(0, 1)


# --- PSNR ---------------------------------------------------------------------------------


def test_psnr_of_a_uniform_offset_of_one_tenth_is_20_db():
    x = torch.full((1, 3, 8, 8), 0.4)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)


def test_psnr_uses_max_val():
    x = torch.full((1, 3, 8, 8), 100.0)
    assert psnr(x, x + 25.5, max_val=255.0) == pytest.approx(20.0, abs=1e-4)


def test_psnr_averages_per_image_values_not_the_batch_mse():
    x = torch.full((2, 3, 8, 8), 0.5)
    x_hat = x.clone()
    x_hat[0] += 0.1  # mse 1e-2 -> 20 dB
    x_hat[1] += 0.01  # mse 1e-4 -> 40 dB
    per_image = psnr_per_image(x, x_hat)
    assert per_image.shape == (2,)
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert psnr(x, x_hat) == pytest.approx(30.0, abs=1e-3)  # PSNR of mean MSE would be 22.97


def test_psnr_of_identical_images_is_capped_at_100_db():
    x = torch.rand(2, 3, 8, 8)
    assert psnr(x, x.clone()) == MAX_DB == 100.0
    assert psnr_per_image(x, x).tolist() == [100.0, 100.0]


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9), r"\(1, 3, 8, 9\)"),
        (torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), r"\(3, 8, 8\)"),
    ],
)
def test_psnr_refuses_mismatched_or_unbatched_images(a, b, match):
    with pytest.raises(ValueError, match=match):
        psnr(a, b)


# --- MS-SSIM ------------------------------------------------------------------------------


def test_ms_ssim_of_identical_images_is_one():
    x = _image(176).unsqueeze(0)
    assert ms_ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_on_large_images_is_pytorch_msssim_per_image():
    x = torch.stack([_image(176, 0), _image(176, 1)])
    noise = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_hat = (x + noise * torch.tensor([0.2, 1.0]).view(2, 1, 1, 1)).clamp(0, 1)
    per_image = ms_ssim_per_image(x, x_hat)
    expected = reference_ms_ssim(x_hat, x, data_range=1.0, size_average=False)
    assert torch.allclose(per_image, expected)
    assert per_image[0] > per_image[1]  # less noise scores higher
    assert ms_ssim(x, x_hat) == pytest.approx(expected.mean().item())


def test_the_fallback_computation_matches_pytorch_msssim_with_five_scales():
    x = _image(176, 0).unsqueeze(0)
    x_hat = _image(176, 1).unsqueeze(0)
    ours = metrics._ms_ssim_with_levels(x_hat, x, levels=5)
    assert ours.item() == pytest.approx(reference_ms_ssim(x_hat, x, data_range=1.0).item(), abs=1e-4)


@pytest.mark.parametrize(
    "side, levels", [(10, 0), (11, 1), (20, 1), (21, 2), (41, 3), (80, 3), (81, 4), (160, 4), (161, 5)]
)
def test_ms_ssim_levels_follow_the_window_size(side, levels):
    assert ms_ssim_levels(side, 1000) == levels
    assert ms_ssim_levels(1000, side) == levels


def test_ms_ssim_on_small_images_warns_and_uses_fewer_scales():
    x = _image(64).unsqueeze(0)
    with pytest.warns(UserWarning, match="3 of 5 scales"):
        identical = ms_ssim(x, x.clone())
    with pytest.warns(UserWarning):
        noisy = ms_ssim(x, (x + 0.1 * torch.randn(x.shape)).clamp(0, 1))
    assert identical == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < noisy < 0.99


def test_single_scale_fallback_is_the_ssim_of_constant_images():
    # For constant images the contrast-structure term is 1, so one-scale MS-SSIM is the
    # luminance term (2ab + C1) / (a^2 + b^2 + C1) with C1 = 0.01^2.
    x = torch.full((1, 3, 16, 16), 0.5)
    x_hat = torch.full((1, 3, 16, 16), 0.6)
    expected = (2 * 0.5 * 0.6 + 1e-4) / (0.5**2 + 0.6**2 + 1e-4)
    with pytest.warns(UserWarning, match="1 of 5 scales"):
        assert ms_ssim(x, x_hat) == pytest.approx(expected, rel=1e-4)


def test_ms_ssim_refuses_images_without_a_single_scale():
    x = torch.rand(1, 3, 10, 64)
    with pytest.raises(ValueError, match="10x64"):
        ms_ssim(x, x)


def test_ms_ssim_db():
    assert ms_ssim_db(0.99) == pytest.approx(20.0)
    assert ms_ssim_db(0.9) == pytest.approx(10.0)
    assert ms_ssim_db(0.0) == 0.0
    assert ms_ssim_db(1.0) == MAX_DB
    with pytest.raises(ValueError, match="1.5"):
        ms_ssim_db(1.5)


# --- bits per pixel -----------------------------------------------------------------------


def _half_and_quarter_likelihoods():
    # 2*4*3*3 = 72 symbols of probability 1/2 (1 bit each) and 2*2*1*1 = 4 of 1/4 (2 bits).
    return {"y": torch.full((2, 4, 3, 3), 0.5), "z": torch.full((2, 2, 1, 1), 0.25)}


def test_bpp_from_likelihoods_counts_minus_log2_over_pixels():
    bpp = bpp_from_likelihoods(_half_and_quarter_likelihoods(), num_pixels=2 * 8 * 8)
    assert isinstance(bpp, torch.Tensor)
    assert bpp.item() == pytest.approx((72 + 8) / 128)


def test_bpp_per_likelihood_names_each_latent():
    parts = bpp_per_likelihood(_half_and_quarter_likelihoods(), num_pixels=128)
    assert parts == pytest.approx({"y": 72 / 128, "z": 8 / 128})


def test_bpp_from_likelihoods_refuses_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        bpp_from_likelihoods({}, num_pixels=128)
    with pytest.raises(ValueError, match="num_pixels 0"):
        bpp_from_likelihoods(_half_and_quarter_likelihoods(), num_pixels=0)


def test_bpp_from_bytes():
    assert bpp_from_bytes(1000, 100, 80) == 1.0
    assert bpp_from_bytes(3, 4, 4) == 1.5
    assert bpp_from_bytes(0, 4, 4) == 0.0
    with pytest.raises(ValueError, match="-1"):
        bpp_from_bytes(-1, 4, 4)
    with pytest.raises(ValueError, match="0x4"):
        bpp_from_bytes(10, 0, 4)


# --- JPEG baseline ------------------------------------------------------------------------
# 96 px images keep these tests fast; their MS-SSIM uses 4 scales and warns, which is
# tested above and silenced here.
JPEG_SIZE = 96
jpeg_test = pytest.mark.filterwarnings("ignore:MS-SSIM on")


def _jpeg_bpp_by_quality(image: torch.Tensor) -> dict[int, float]:
    """Independent oracle: real JPEG bpp at every searchable quality, straight from Pillow."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array)
    out = {}
    for quality in range(1, 96):
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality)
        out[quality] = 8 * len(buffer.getvalue()) / (image.shape[1] * image.shape[2])
    return out


@pytest.fixture(scope="module")
def jpeg_image():
    image = _image(JPEG_SIZE)
    return image, _jpeg_bpp_by_quality(image)


@jpeg_test
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.8])
def test_jpeg_at_bpp_picks_the_quality_nearest_the_target(jpeg_image, fraction):
    image, bpp_by_quality = jpeg_image
    low, high = bpp_by_quality[1], bpp_by_quality[95]
    target = low + fraction * (high - low)
    point = jpeg_at_bpp(image, target)
    best_distance = min(abs(b - target) for b in bpp_by_quality.values())
    assert abs(point["bpp"] - target) == pytest.approx(best_distance)
    assert point["bpp"] == pytest.approx(bpp_by_quality[point["quality"]])


@jpeg_test
def test_jpeg_at_bpp_hits_an_achievable_rate_exactly(jpeg_image):
    image, bpp_by_quality = jpeg_image
    point = jpeg_at_bpp(image, bpp_by_quality[50])
    assert point["bpp"] == pytest.approx(bpp_by_quality[50])
    assert 20 < point["psnr"] < 60
    assert 0.8 < point["ms_ssim"] < 1.0
    # Its numbers are those of the curve at the same quality.
    (curve_point,) = jpeg_curve([image], [point["quality"]])
    assert curve_point == pytest.approx(point)


@jpeg_test
def test_higher_target_bpp_gives_higher_quality_and_psnr(jpeg_image):
    image, bpp_by_quality = jpeg_image
    low = jpeg_at_bpp(image, bpp_by_quality[20])
    high = jpeg_at_bpp(image, bpp_by_quality[80])
    assert high["quality"] > low["quality"]
    assert high["bpp"] > low["bpp"]
    assert high["psnr"] > low["psnr"]
    assert high["ms_ssim"] > low["ms_ssim"]


@jpeg_test
def test_targets_outside_the_jpeg_range_give_the_end_qualities(jpeg_image):
    image, bpp_by_quality = jpeg_image
    assert jpeg_at_bpp(image, bpp_by_quality[1] / 10)["quality"] == 1
    assert jpeg_at_bpp(image, bpp_by_quality[95] * 10)["quality"] == 95


@jpeg_test
def test_jpeg_at_bpp_accepts_a_pil_image(jpeg_image):
    image, _ = jpeg_image
    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    from_pil, from_tensor = jpeg_at_bpp(Image.fromarray(array), 2.0), jpeg_at_bpp(image, 2.0)
    assert from_pil["quality"] == from_tensor["quality"]
    assert from_pil["bpp"] == from_tensor["bpp"]
    # The PIL original is the 8-bit rounding of the tensor, so quality differs only slightly.
    assert from_pil["psnr"] == pytest.approx(from_tensor["psnr"], abs=0.5)


@jpeg_test
def test_jpeg_curve_averages_over_images_and_rises_with_quality():
    images = [_image(JPEG_SIZE, 0), _image(JPEG_SIZE, 1)]
    qualities = [10, 50, 90]
    curve = jpeg_curve(images, qualities)
    assert [p["quality"] for p in curve] == qualities
    for lower, higher in zip(curve, curve[1:]):
        assert higher["bpp"] > lower["bpp"]
        assert higher["psnr"] > lower["psnr"]
    singles = [jpeg_curve([im], qualities) for im in images]
    for i, point in enumerate(curve):
        for key in ("bpp", "psnr", "ms_ssim"):
            assert point[key] == pytest.approx((singles[0][i][key] + singles[1][i][key]) / 2)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1.0"])
def test_jpeg_at_bpp_refuses_bad_targets(bad):
    with pytest.raises(ValueError, match="target_bpp"):
        jpeg_at_bpp(_image(16), bad)


def test_jpeg_refuses_bad_qualities_and_images():
    with pytest.raises(ValueError, match="quality 0"):
        jpeg_curve([_image(16)], [0])
    with pytest.raises(ValueError, match="quality 101"):
        jpeg_curve([_image(16)], [50, 101])
    with pytest.raises(ValueError, match="No images"):
        jpeg_curve([], [50])
    with pytest.raises(ValueError, match=r"\(1, 16, 16\)"):
        jpeg_at_bpp(torch.rand(1, 16, 16), 1.0)
