"""Evaluation with real bitstreams: every image is compressed to bytes and decoded back.

Rates are counted from the bytes of the taskcodec file (header included), next to the rate
the likelihoods promise; quality is PSNR and MS-SSIM of the decoded image against the original.
Everything is logged to a new MLflow run linked to the evaluated one, with a per-image CSV
and a picture of originals over reconstructions.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from taskcodec import tracking
from taskcodec.codecs.loading import PAD_MULTIPLE, LoadedCodec, load_codec
from taskcodec.config import EvalConfig
from taskcodec.data import build_dataset
from taskcodec.data.transforms import crop_padding, pad_to_multiple
from taskcodec.metrics import bpp_from_bytes, bpp_from_likelihoods, ms_ssim, psnr

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("bpp", "bpp_estimated", "psnr", "ms_ssim", "encode_time", "decode_time")


@dataclass
class ImageResult:
    index: int
    height: int
    width: int
    num_bytes: int
    bpp: float
    bpp_estimated: float
    psnr: float
    ms_ssim: float
    encode_time: float
    decode_time: float


def evaluate_image(codec: LoadedCodec, x: torch.Tensor, index: int = 0
                   ) -> tuple[ImageResult, torch.Tensor]:
    """Compress one image (3xHxW) to real bytes, decode it, and measure."""
    x = x.unsqueeze(0)
    height, width = x.shape[-2:]
    start = time.perf_counter()
    data = codec.compress(x)
    encode_time = time.perf_counter() - start
    start = time.perf_counter()
    x_hat = codec.decompress(data)
    decode_time = time.perf_counter() - start
    with torch.no_grad():
        padded, _ = pad_to_multiple(x, PAD_MULTIPLE)
        likelihoods = codec.model(padded)["likelihoods"]
    result = ImageResult(
        index=index, height=int(height), width=int(width), num_bytes=len(data),
        bpp=bpp_from_bytes(len(data), int(height), int(width)),
        bpp_estimated=float(bpp_from_likelihoods(likelihoods, int(height) * int(width))),
        psnr=psnr(x, x_hat), ms_ssim=ms_ssim(x, x_hat),
        encode_time=encode_time, decode_time=decode_time)
    return result, x_hat[0]


def summarize(results: list[ImageResult]) -> dict[str, float]:
    return {k: mean(getattr(r, k) for r in results) for k in SUMMARY_KEYS}


def jpeg_reference(images: list[torch.Tensor], bpps: list[float]) -> dict[str, float]:
    """JPEG (Pillow) per image at the quality whose bpp is nearest the codec's, averaged."""
    from taskcodec.baselines import jpeg_at_bpp

    points = [jpeg_at_bpp(img, bpp) for img, bpp in zip(images, bpps)]
    return {f"jpeg_{k}": mean(p[k] for p in points) for k in ("bpp", "psnr", "ms_ssim")}


def save_grid(originals: list[torch.Tensor], recons: list[torch.Tensor], path: Path,
              height: int = 160, limit: int = 6) -> Path:
    """Originals on top, reconstructions below, each scaled to ``height`` pixels."""
    from PIL import Image

    def thumb(t: torch.Tensor) -> Image.Image:
        array = (t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
        img = Image.fromarray(array)
        return img.resize((max(1, round(img.width * height / img.height)), height))

    tops = [thumb(t) for t in originals[:limit]]
    bottoms = [thumb(t) for t in recons[:limit]]
    width = sum(t.width for t in tops) + 4 * (len(tops) - 1)
    grid = Image.new("RGB", (width, 2 * height + 4), "white")
    x = 0
    for top, bottom in zip(tops, bottoms):
        grid.paste(top, (x, 0))
        grid.paste(bottom, (x, height + 4))
        x += top.width + 4
    grid.save(path)
    return path


def write_csv(results: list[ImageResult], path: Path) -> Path:
    fields = list(ImageResult.__dataclass_fields__)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({k: getattr(r, k) for k in fields})
    return path


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    head = f"{'':<28}{'bpp':>8}{'PSNR dB':>10}{'MS-SSIM':>10}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<28}{m['bpp']:>8.3f}{m['psnr']:>10.2f}{m['ms_ssim']:>10.4f}")
    return "\n".join(lines)


def evaluate(config: EvalConfig, out_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (run id or path) and log the results as a new MLflow run."""
    import tempfile

    import mlflow
    from tqdm import tqdm

    from taskcodec.engine import progress_enabled

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    codec = load_codec(config.checkpoint, config.which)
    dataset = build_dataset(config.data, config.split, max_side=config.max_side)
    count = len(dataset) if not config.max_images else min(config.max_images, len(dataset))
    results, originals, recons = [], [], []
    for i in tqdm(range(count), desc="evaluate", unit="image", disable=not progress_enabled()):
        x = dataset[i]
        result, x_hat = evaluate_image(codec, x, i)
        results.append(result)
        originals.append(x)
        recons.append(x_hat)
    summary = summarize(results)
    if config.jpeg:
        summary.update(jpeg_reference(originals, [r.bpp for r in results]))

    evaluated_run = config.checkpoint if len(config.checkpoint) == 32 else ""
    params = {"codec": codec.name, "lmbda": codec.config.get("lmbda"), "N": codec.config.get("N"),
              "M": codec.config.get("M"), "metric": codec.config.get("metric"),
              "checkpoint": config.checkpoint, "which": config.which, "data": config.data,
              "split": config.split, "images": count}
    tags = {"method": codec.name, "codec": codec.name, "entry_point": "evaluate",
            "checkpoint_fingerprint": codec.fingerprint, **tracking.environment_tags()}
    if evaluated_run:
        tags["evaluated_run_id"] = evaluated_run
    active = mlflow.active_run()
    started = active is None
    if started:
        mlflow.set_experiment(tracking.experiment_name())
        active = mlflow.start_run(run_name=config.run_name or None)
    try:
        already = mlflow.tracking.MlflowClient(uri).get_run(active.info.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in already})
        mlflow.set_tags(tags)
        mlflow.log_metrics(summary)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(out_dir) if out_dir else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            mlflow.log_artifact(str(write_csv(results, folder / "per_image.csv")), "evaluation")
            mlflow.log_artifact(str(save_grid(originals, recons, folder / "reconstructions.png")),
                                "evaluation")
    finally:
        if started:
            mlflow.end_run()
    return {"run_id": active.info.run_id, "summary": summary, "results": results,
            "codec": codec.name}
