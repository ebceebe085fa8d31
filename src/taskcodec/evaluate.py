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
from taskcodec.data.transforms import pad_to_multiple
from taskcodec.errors import BitstreamError, DataError, TaskcodecError
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
    x_hat = codec.decompress(data)["x_hat"]
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


TABLE_COLUMNS = (("bpp", "bpp", ".3f"), ("bpp_base", "bpp base", ".3f"),
                 ("bpp_enh", "bpp enh", ".3f"), ("psnr", "PSNR dB", ".2f"),
                 ("ms_ssim", "MS-SSIM", ".4f"), ("map", "mAP", ".4f"), ("map50", "mAP@.5", ".4f"),
                 ("miou", "mIoU", ".4f"), ("abs_rel", "AbsRel", ".4f"),
                 ("accuracy", "accuracy", ".4f"))


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """The rows' shared metrics as an aligned text table (blank where a row lacks one)."""
    columns = [c for c in TABLE_COLUMNS if any(c[0] in m for _, m in rows)]
    width = max([28] + [len(name) + 2 for name, _ in rows])
    head = f"{'':<{width}}" + "".join(f"{label:>10}" for _, label, _ in columns)
    lines = [head, "-" * len(head)]
    for name, m in rows:
        cells = "".join(f"{m[key]:>10{fmt}}" if key in m else f"{'':>10}"
                        for key, _, fmt in columns)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def _layer_bytes(codec: LoadedCodec, data: bytes) -> dict[str, int]:
    """Bytes of each layer as sent: the base layer carries the header."""
    from taskcodec import bitstream

    header, layers = bitstream.unpack(data)
    sizes = {layer.name: layer.payload_size for layer in layers}
    sizes[layers[0].name] += bitstream.header_size(header, layers)
    return sizes


def evaluate_task_sample(codec: LoadedCodec, image: torch.Tensor, target: dict,
                         evaluators: dict) -> dict[str, float]:
    """Code one sample with the layered format; decode the base alone, then both layers."""
    x = image.unsqueeze(0)
    height, width = x.shape[-2:]
    pixels = int(height) * int(width)
    start = time.perf_counter()
    data = codec.compress(x)
    encode_time = time.perf_counter() - start
    start = time.perf_counter()
    base_only = codec.decompress(data, layers={"base"})
    decode_base_time = time.perf_counter() - start
    evaluators["base"].add(base_only["task"], [target], x)
    sizes = _layer_bytes(codec, data)
    row = {"bpp": bpp_from_bytes(len(data), int(height), int(width)),
           "bpp_base": 8 * sizes["base"] / pixels, "encode_time": encode_time,
           "decode_base_time": decode_base_time}
    if codec.kind == "scalable":
        start = time.perf_counter()
        full = codec.decompress(data)
        row["decode_time"] = time.perf_counter() - start
        row["bpp_enh"] = 8 * sizes["enhancement"] / pixels
        if "x_hat" in full:
            row["psnr"] = psnr(x, full["x_hat"])
            row["ms_ssim"] = ms_ssim(x, full["x_hat"])
        else:
            evaluators["enhancement"].add(full["logits"], [target], x)
    return row


def _survive(index: int, failures: list[str] | None, work):
    """``work()``, or None after logging and recording a bad image or file in ``failures``:
    one bad item must not cost the results of the others (the command exits non-zero at the
    end). Without a ``failures`` list the error is raised."""
    try:
        return work()
    except (BitstreamError, DataError) as err:
        if failures is None:
            raise
        log.warning("image %d: %s", index, err)
        failures.append(f"image {index}: {err}")
        return None


def _data_source(config: EvalConfig, codec: LoadedCodec) -> str:
    return config.data or str(codec.config.get("data") or "embedded")


def _evaluate_task(config: EvalConfig, codec: LoadedCodec, failures: list[str] | None = None
                   ) -> tuple[dict, list[dict], dict]:
    from statistics import mean as average

    from tqdm import tqdm

    from taskcodec.data import build_task_dataset
    from taskcodec.engine import progress_enabled
    from taskcodec.recipes import TaskEvaluator

    base_args = codec.model_args.get("base", codec.model_args)
    task = codec.task
    target = codec.model_args.get("target", "")
    # Both layers are scored: the base on its task, a segmentation enhancement on masks.
    dataset = build_task_dataset(_data_source(config, codec), config.split,
                                 task=(task, "segmentation") if target == "segmentation" else task,
                                 size=int(codec.config.get("image_size", 128)),
                                 seed=int(codec.config.get("seed", 0)))
    evaluators = {"base": TaskEvaluator(task, int(base_args["num_classes"]))}
    if target == "segmentation":
        evaluators["enhancement"] = TaskEvaluator("segmentation",
                                                  int(codec.model_args["num_classes"]))
    count = len(dataset) if not config.max_images else min(config.max_images, len(dataset))
    rows = []
    for i in tqdm(range(count), desc="evaluate", unit="image", disable=not progress_enabled()):
        def work(i=i):
            image, sample_target = dataset[i]
            return evaluate_task_sample(codec, image, sample_target, evaluators)
        row = _survive(i, failures, work)
        if row is not None:
            rows.append({"index": i, **row})
    _check_some(rows, failures)
    summary = {k: average(r[k] for r in rows) for k in rows[0] if k != "index"}
    base_metrics = evaluators["base"].result()
    if task == "reconstruction":
        summary.update({f"base_{k}": v for k, v in base_metrics.items()})
    else:
        summary.update(base_metrics)
    if "enhancement" in evaluators:
        summary.update(evaluators["enhancement"].result())
    return summary, rows, {"task": task, "target": target}


def _evaluate_images(config: EvalConfig, codec: LoadedCodec, failures: list[str] | None = None
                     ) -> tuple[dict, list[ImageResult], list, list]:
    from tqdm import tqdm

    from taskcodec.engine import progress_enabled

    dataset = build_dataset(_data_source(config, codec), config.split, max_side=config.max_side)
    count = len(dataset) if not config.max_images else min(config.max_images, len(dataset))
    results, originals, recons = [], [], []
    for i in tqdm(range(count), desc="evaluate", unit="image", disable=not progress_enabled()):
        def work(i=i):
            x = dataset[i]
            return (x, *evaluate_image(codec, x, i))
        done = _survive(i, failures, work)
        if done is None:
            continue
        x, result, x_hat = done
        results.append(result)
        originals.append(x)
        recons.append(x_hat)
    _check_some(results, failures)
    summary = summarize(results)
    if config.jpeg:
        summary.update(jpeg_reference(originals, [r.bpp for r in results]))
    return summary, results, originals, recons


def _check_some(results: list, failures: list[str] | None) -> None:
    if not results and failures:
        raise TaskcodecError(f"no image could be evaluated ({len(failures)} failed; first: "
                             f"{failures[0]})")


def _write_rows(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def evaluate(config: EvalConfig, out_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (run id or path) and log the results as a new MLflow run."""
    import tempfile

    import mlflow

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    codec = load_codec(config.checkpoint, config.which)
    stored = codec.config
    params = {"codec": codec.name, "checkpoint": config.checkpoint, "which": config.which,
              "data": _data_source(config, codec), "split": config.split}
    tags = {"codec": codec.name, "entry_point": "evaluate", "kind": codec.kind,
            "checkpoint_fingerprint": codec.fingerprint, **tracking.environment_tags()}
    failures: list[str] = []
    if codec.kind == "codec":
        summary, results, originals, recons = _evaluate_images(config, codec, failures)
        rows = [{k: getattr(r, k) for k in ImageResult.__dataclass_fields__} for r in results]
        params.update({"lmbda": stored.get("lmbda"), "N": stored.get("N"), "M": stored.get("M"),
                       "metric": stored.get("metric")})
        tags["method"] = codec.name
    else:
        summary, rows, info = _evaluate_task(config, codec, failures)
        originals = recons = []
        base_config = codec.model_args.get("base", {})
        params.update({"alpha": stored.get("alpha"), "N": stored.get("N"), "M": stored.get("M")})
        tags.update({"task": info["task"], "layer": codec.kind, "alpha": str(stored.get("alpha"))})
        if codec.kind == "scalable":
            tags.update({"method": codec.model_args["method"], "target": info["target"]})
            base_run = stored.get("base_run", "")
            if len(base_run) == 32:
                tags["base_run_id"] = base_run
            tags["beta"] = str(base_config.get("beta", stored.get("beta", "")))
        else:
            tags.update({"method": f"base-{info['task']}-beta{float(stored.get('beta', 0)):g}",
                         "beta": str(stored.get("beta", ""))})
    params["images"] = len(rows)
    if failures:
        tags["failed_images"] = str(len(failures))
    evaluated_run = config.checkpoint if len(config.checkpoint) == 32 else ""
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
        mlflow.log_metrics({k: v for k, v in summary.items() if v == v})  # NaN is not logged
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(out_dir) if out_dir else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            mlflow.log_artifact(str(_write_rows(rows, folder / "per_image.csv")), "evaluation")
            if originals:
                mlflow.log_artifact(str(save_grid(originals, recons,
                                                  folder / "reconstructions.png")), "evaluation")
    finally:
        if started:
            mlflow.end_run()
    return {"run_id": active.info.run_id, "summary": summary, "results": rows,
            "codec": codec.name, "kind": codec.kind, "failures": failures}
