"""Evaluation with real bitstreams: every image is compressed to bytes and decoded back.

Rates are counted from the bytes of the taskcodec file (header included), next to the rate
the likelihoods promise; quality is PSNR and MS-SSIM of the decoded image against the original.
Everything is logged to a new MLflow run linked to the evaluated one, with a per-image CSV
and a picture of originals over reconstructions (over the base layer's previews, for task
codecs whose base has a probe or a synthesis head).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from taskcodec import model_registry, tracking
from taskcodec.codecs.loading import PAD_MULTIPLE, LoadedCodec, header_name, load_codec
from taskcodec.config import EvalConfig, parse_anchors, parse_rates
from taskcodec.data import build_dataset
from taskcodec.data.base import check_plain_split
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


def evaluate_image(codec: LoadedCodec, x: torch.Tensor, index: int = 0, rate: int | None = None
                   ) -> tuple[ImageResult, torch.Tensor]:
    """Compress one image (3xHxW) to real bytes, decode it, and measure (``rate``: the rate
    point of a variable-rate codec, its default when None)."""
    x = x.unsqueeze(0)
    height, width = x.shape[-2:]
    rate = codec.default_rate if rate is None else rate
    start = time.perf_counter()
    data = codec.compress(x, rate)
    encode_time = time.perf_counter() - start
    start = time.perf_counter()
    x_hat = codec.decompress(data)["x_hat"]
    decode_time = time.perf_counter() - start
    with torch.no_grad():
        padded, _ = pad_to_multiple(x, PAD_MULTIPLE)
        likelihoods = codec.model(padded, **codec.rate_kwargs(rate))["likelihoods"]
    result = ImageResult(
        index=index, height=int(height), width=int(width), num_bytes=len(data),
        bpp=bpp_from_bytes(len(data), int(height), int(width)),
        bpp_estimated=float(bpp_from_likelihoods(likelihoods, int(height) * int(width))),
        psnr=psnr(x, x_hat), ms_ssim=ms_ssim(x, x_hat),
        encode_time=encode_time, decode_time=decode_time)
    return result, x_hat[0]


def summarize(results: list[ImageResult]) -> dict[str, float]:
    return {k: mean(getattr(r, k) for r in results) for k in SUMMARY_KEYS}


def anchor_reference(images: list[torch.Tensor], bpps: list[float], anchors: tuple[str, ...]
                     ) -> tuple[dict[str, float], dict[str, str]]:
    """Each anchor (Pillow) per image at the quality whose bpp is nearest the codec's.

    Returns the metrics (``<anchor>_bpp``, ``_psnr``, ``_ms_ssim``: means over the images) and
    the params (``anchor_<anchor>_quality``: the qualities chosen, then the fixed encoder
    settings such as ``anchor_webp_method``). An anchor this Pillow cannot code is skipped with
    one warning line, and ``anchor_<anchor>`` says why.
    """
    from taskcodec.baselines import anchor_at_bpp, anchor_settings, unavailable

    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    for name in anchors:
        reason = unavailable(name)
        if reason:
            log.warning("%s anchor skipped: %s", name.upper(), reason)
            params[f"anchor_{name}"] = f"unavailable: {reason}"[:500]
            continue
        points = [anchor_at_bpp(name, img, bpp) for img, bpp in zip(images, bpps)]
        metrics.update({f"{name}_{k}": mean(p[k] for p in points)
                        for k in ("bpp", "psnr", "ms_ssim")})
        params[f"anchor_{name}_quality"] = _qualities([p["quality"] for p in points])
        params.update({f"anchor_{name}_{k}": v for k, v in anchor_settings(name).items()})
    return metrics, params


def _qualities(chosen: list[int]) -> str:
    """The qualities chosen per image, in image order; their range and median past 40 images."""
    if len(chosen) <= 40:
        return ",".join(map(str, chosen))
    return (f"{min(chosen)}-{max(chosen)} (median {sorted(chosen)[len(chosen) // 2]}, "
            f"{len(chosen)} images)")


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
                 ("disparity_rmse", "disp RMSE", ".3f"), ("psnr_base", "PSNR base", ".2f"),
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
    """Bytes of each layer as sent: the base layer carries the header (``header``: its bytes
    alone, the container's overhead)."""
    from taskcodec import bitstream

    header, layers = bitstream.unpack(data)
    sizes = {layer.name: layer.payload_size for layer in layers}
    sizes["header"] = bitstream.header_size(header, layers)
    sizes[layers[0].name] += sizes["header"]
    return sizes


def _estimated_rates(codec: LoadedCodec, x: torch.Tensor, pixels: int) -> dict[str, float]:
    """What the likelihoods promise per layer (the papers' rates: no header, no coder
    overhead), per pixel of the unpadded image as the real-byte rates."""
    padded, _ = pad_to_multiple(x, PAD_MULTIPLE)
    with torch.no_grad():
        if codec.kind == "scalable":
            out = codec.model(padded)
            rates = {"bpp_base_estimated": bpp_from_likelihoods(out["base_likelihoods"], pixels),
                     "bpp_enh_estimated": bpp_from_likelihoods(out["likelihoods"], pixels)}
        else:
            base = codec.model
            rates = {"bpp_base_estimated": bpp_from_likelihoods(
                base.coder(base.g_a(padded))[1], pixels)}
    return {k: float(v) for k, v in rates.items()}


def evaluate_task_sample(codec: LoadedCodec, image: torch.Tensor, target: dict,
                         evaluators: dict, previews: list | None = None) -> dict[str, float]:
    """Code one sample with the layered format; decode the base alone, then both layers.

    ``bpp`` is the rate the method is charged for (paper 1's upper baseline: the
    enhancement's bytes only; every other method: the whole file); ``bpp_file`` is the file.
    """
    from taskcodec.codecs.scalable import charged_rate, method_of

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
    estimated = _estimated_rates(codec, x, pixels)
    row = {"bpp": bpp_from_bytes(len(data), int(height), int(width)),
           "bpp_file": bpp_from_bytes(len(data), int(height), int(width)),
           "bpp_base": 8 * sizes["base"] / pixels, "header_bytes": sizes["header"],
           "bpp_header": 8 * sizes["header"] / pixels,
           "bpp_estimated": estimated["bpp_base_estimated"], **estimated,
           "encode_time": encode_time, "decode_base_time": decode_base_time}
    # Previews apart from the timed decoding: the base layer alone, seen by a human.
    shown = codec.decompress(data, layers={"base"}, previews=True) if codec.has_previews else {}
    for key, name in (("preview", "psnr_base"), ("prediction", "psnr_pred")):
        if key in shown:
            row[name] = psnr(x, shown[key])
    if previews is not None and "preview" in shown:
        previews.append(shown["preview"][0])
    if codec.kind == "scalable":
        method = method_of(codec.model_args)
        start = time.perf_counter()
        full = codec.decompress(data)
        row["decode_time"] = time.perf_counter() - start
        row["bpp_enh"] = 8 * sizes["enhancement"] / pixels
        row["bpp"] = charged_rate(method, row["bpp_base"], row["bpp_enh"])
        row["bpp_estimated"] = charged_rate(method, estimated["bpp_base_estimated"],
                                            estimated["bpp_enh_estimated"])
        if "x_hat" in full:
            row["psnr"] = psnr(x, full["x_hat"])
            row["ms_ssim"] = ms_ssim(x, full["x_hat"])
        else:
            evaluators["enhancement"].add(full["logits"], [target], x)
    return row


def rd_point(model: torch.nn.Module, model_args: dict[str, Any], dataset: Any,
             max_images: int) -> dict[str, float]:
    """Real-bitstream RD point of a model being trained, on the first ``max_images`` items of
    ``dataset``: the same coding as :func:`evaluate_image`, on a copy of the model (whose
    entropy tables are built here; the trained model is left as it was).

    Returns ``test_bpp``, ``test_psnr``, ``test_ms_ssim`` and ``test_bpp_gap`` (real minus
    estimated bpp: the header and the entropy coder's overhead).
    """
    import copy

    from taskcodec.bitstream import checkpoint_fingerprint

    replica = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    replica.update(force=True)
    state = {k: v.contiguous() for k, v in replica.state_dict().items()}
    codec = LoadedCodec(name=header_name(model_args, {}), kind="codec", model=replica,
                        fingerprint=checkpoint_fingerprint(state), config={},
                        model_args=model_args, source="training")
    results = [evaluate_image(codec, dataset[i], i)[0]
               for i in range(min(max_images, len(dataset)))]
    summary = summarize(results)
    return {"test_bpp": summary["bpp"], "test_psnr": summary["psnr"],
            "test_ms_ssim": summary["ms_ssim"],
            "test_bpp_gap": summary["bpp"] - summary["bpp_estimated"]}


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


def data_seed_of(config: EvalConfig, codec: LoadedCodec) -> int:
    """The data seed of the evaluated scenes: ``config.data_seed``, else the checkpoint's own
    (a checkpoint from before ``data_seed`` existed drew its scenes from ``seed``)."""
    if config.data_seed >= 0:
        return config.data_seed
    stored = codec.config
    return int(stored.get("data_seed", stored.get("seed", 0)))


class DataDigest:
    """A content digest of the evaluated images (their pixels, in order): the same images give
    the same digest wherever they are stored, so runs on different data are never mixed."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def add(self, image: torch.Tensor) -> None:
        pixels = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        self._hash.update(repr(tuple(pixels.shape)).encode())
        self._hash.update(pixels.numpy().tobytes())
        self.count += 1

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


def data_name(source: str) -> str:
    """A short name of a data source: a path's last part (kodak for ~/data/kodak/)."""
    kind, sep, rest = source.partition(":")
    path = rest if sep and kind in ("coco", "cityscapes") else source
    return Path(path.rstrip("/")).name.split(".")[0] or source if "/" in path else source


def data_info(source: str, split: str, digest: DataDigest) -> dict[str, Any]:
    return {"data": source, "data_name": data_name(source), "split": split,
            "images": digest.count, "data_digest": digest.hexdigest()}


def listing_info(dataset: Any, source: str, split: str, data_seed: int = 0) -> dict[str, Any]:
    """:func:`data_info` of a training or validation set, without reading its images: the
    digest is of what the set lists (its files' names relative to their folder, else its
    description) and, for the procedural scenes, their data seed. Evaluate's digest is of the
    pixels; this one tells a training run's data apart at no cost."""
    import os

    from taskcodec.data import describe

    names = [str(n) for n in getattr(dataset, "names", None) or []]
    digest = hashlib.sha256(f"{source}\0{split}".encode())
    if source == "scenes":
        digest.update(f"\0data_seed={data_seed}".encode())
    if names and all(os.sep in n for n in names):  # files (not embedded or scene names)
        names = [os.path.abspath(n) for n in names]
        root = os.path.commonpath([os.path.dirname(n) for n in names])
        names = [os.path.relpath(n, root) for n in names]
    for name in names or [describe(dataset)]:
        digest.update(f"\0{name}".encode())
    return {"data": source, "data_name": data_name(source), "split": split,
            "images": len(names) or len(dataset), "data_digest": digest.hexdigest()[:16]}


def describe_data(info: dict[str, Any]) -> str:
    """The line above the table: what was measured."""
    count = info["images"]
    return (f"{count} image{'' if count == 1 else 's'} of {info['data']} (split {info['split']}, "
            f"digest {info['data_digest']})")


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
    source = _data_source(config, codec)
    split = check_plain_split("val" if config.split == "auto" else config.split, source)
    # Procedural scenes have as many images as asked for: --max-images sets their number.
    length = {"length": config.max_images} if source == "scenes" and config.max_images else {}
    dataset = build_task_dataset(_data_source(config, codec), split,
                                 task=(task, "segmentation") if target == "segmentation" else task,
                                 size=int(codec.config.get("image_size", 128)),
                                 data_seed=data_seed_of(config, codec), **length)
    evaluators = {"base": TaskEvaluator(task, int(base_args["num_classes"]),
                                        str(base_args.get("depth_target", "depth")))}
    if target == "segmentation":
        evaluators["enhancement"] = TaskEvaluator("segmentation",
                                                  int(codec.model_args["num_classes"]))
    count = len(dataset) if not config.max_images else min(config.max_images, len(dataset))
    rows, originals, previews = [], [], []
    digest = DataDigest()
    for i in tqdm(range(count), desc="evaluate", unit="image", disable=not progress_enabled()):
        def work(i=i):
            image, sample_target = dataset[i]
            return image, evaluate_task_sample(codec, image, sample_target, evaluators, previews)
        done = _survive(i, failures, work)
        if done is not None:
            image, row = done
            digest.add(image)
            rows.append({"index": i, **row})
            originals.append(image)
    _check_some(rows, failures)
    summary = {k: average(r[k] for r in rows) for k in rows[0] if k != "index"}
    base_metrics = evaluators["base"].result()
    if task == "reconstruction":
        summary.update({f"base_{k}": v for k, v in base_metrics.items()})
    else:
        summary.update(base_metrics)
    if "enhancement" in evaluators:
        summary.update(evaluators["enhancement"].result())
    return summary, rows, {"task": task, "target": target,
                           "previews": (originals[:len(previews)], previews),
                           "data": data_info(_data_source(config, codec), split, digest)}


def _evaluate_images(config: EvalConfig, codec: LoadedCodec, failures: list[str] | None = None,
                     rate: int | None = None) -> tuple[dict, list[ImageResult], list, list, dict]:
    from tqdm import tqdm

    from taskcodec.engine import progress_enabled

    source = _data_source(config, codec)
    # Scenes have no native size: render them as the codec saw them in its own validation,
    # which is also what the scalable runs of the same size are measured on.
    scenes = {"patch_size": int(codec.config.get("patch_size", 256)),
              "data_seed": data_seed_of(config, codec),
              "epoch_length": config.max_images or None} if source == "scenes" else {}
    dataset = build_dataset(source, config.split, max_side=config.max_side, **scenes)
    count = len(dataset) if not config.max_images else min(config.max_images, len(dataset))
    results, originals, recons = [], [], []
    digest = DataDigest()
    for i in tqdm(range(count), desc="evaluate", unit="image", disable=not progress_enabled()):
        def work(i=i):
            x = dataset[i]
            return (x, *evaluate_image(codec, x, i, rate))
        done = _survive(i, failures, work)
        if done is None:
            continue
        x, result, x_hat = done
        digest.add(x)
        results.append(result)
        originals.append(x)
        recons.append(x_hat)
    _check_some(results, failures)
    summary = summarize(results)
    info = data_info(_data_source(config, codec), getattr(dataset, "split", config.split), digest)
    return summary, results, originals, recons, info


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
    """Evaluate a checkpoint (run id or path) and log the results as a new MLflow run (a
    variable-rate codec: one run per rate point, listed under ``rates``)."""
    import mlflow

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.active_run() is None:
        tracking.check_run_destination(uri)  # before the work, not when logging its results
    codec = load_codec(config.checkpoint, config.which, config.codec)
    rates = rate_points(config, codec)
    if len(rates) == 1:
        return _evaluate_at(config, codec, uri, out_dir, rates[0])
    # One evaluate run per rate point: compare draws them as one curve (the method tag), told
    # apart by their λ. Under a run of the caller's (or of `mlflow run`) they are its children.
    own_parent = mlflow.active_run() is None and bool(os.environ.get("MLFLOW_RUN_ID", "").strip())
    if own_parent:
        tracking.start_run(config.run_name)
    nested = mlflow.active_run() is not None
    try:
        results = [_evaluate_at(config, codec, uri, out_dir and Path(out_dir) / f"rate{rate}",
                                rate, nested) for rate in rates]
    finally:
        if own_parent:
            mlflow.end_run()
    return {**results[-1], "rates": results,
            "failures": [f for r in results for f in r["failures"]]}


def rate_points(config: EvalConfig, codec: LoadedCodec) -> list[int | None]:
    """The rate points ``config.rate`` asks of ``codec``: [None] for a fixed-rate codec; a
    one-line :class:`ConfigError` naming a rate outside the codec's range."""
    from taskcodec.codecs.single import rate_levels

    chosen = parse_rates(config.rate)
    if chosen is None:
        levels = rate_levels(codec.model)
        return list(range(levels)) if levels else [None]
    for rate in chosen:
        codec.rate_kwargs(rate)
    return list(chosen)


def base_tags(base_run: str, base_fingerprint: str, uri: str) -> dict[str, str]:
    """Tags naming an enhancement's base layer: ``base_run_id``, its training run. A registered
    base (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) is the run that logged the model
    version, which ``base_model`` names, unless the alias has since moved to other weights."""
    if not model_registry.is_model_uri(base_run):
        return {"base_run_id": base_run} if len(base_run) == 32 else {}
    tags = {"base_model_uri": base_run}
    try:
        model = model_registry.holding(base_run, base_fingerprint, uri)
    except TaskcodecError as err:  # the evaluation stands without the link
        log.warning("base run not tagged: %s", err)
        return tags
    if model is None:
        log.warning("base run not tagged: %s now holds other weights than the base this "
                    "checkpoint was trained on", base_run)
        return tags
    tags["base_model"] = f"{model.name}/{model.version}"
    if model.run_id:
        tags["base_run_id"] = model.run_id
    return tags


def _evaluate_at(config: EvalConfig, codec: LoadedCodec, uri: str, out_dir: Path | None = None,
                 rate: int | None = None, nested: bool = False) -> dict[str, Any]:
    """Evaluate ``codec`` (at rate point ``rate``) and log the results as one MLflow run."""
    import tempfile

    import mlflow

    stored = codec.config
    # Replicates are grouped by seed and paired on the data: both are logged.
    seeds = {"seed": int(stored.get("seed", 0)), "data_seed": data_seed_of(config, codec)}
    params = {"codec": codec.name, "checkpoint": config.checkpoint, "which": config.which,
              **seeds}
    tags = {"codec": codec.name, "entry_point": "evaluate", "kind": codec.kind,
            **{k: str(v) for k, v in seeds.items()},
            "checkpoint_fingerprint": codec.fingerprint, **tracking.environment_tags()}
    failures: list[str] = []
    if codec.kind == "codec":
        summary, results, originals, recons, data = _evaluate_images(config, codec, failures,
                                                                     rate)
        anchors = parse_anchors(config.anchors, "anchors") if config.jpeg else ()
        anchor_metrics, anchor_params = anchor_reference(originals, [r.bpp for r in results],
                                                         anchors)
        summary.update(anchor_metrics)
        params.update(anchor_params)
        rows = [{k: getattr(r, k) for k in ImageResult.__dataclass_fields__} for r in results]
        params.update({"lmbda": stored.get("lmbda"), "N": stored.get("N"), "M": stored.get("M"),
                       "metric": stored.get("metric")})
        tags["method"] = codec.name
        if rate is not None:  # the rate point's λ labels the point on the curve
            from taskcodec.codecs.single import vbr_lambdas

            lambdas = vbr_lambdas(codec.name, str(stored.get("vbr_lambdas") or ""))
            params.update({"rate": rate, "lmbda": lambdas[rate]})
            tags["rate"] = str(rate)
    else:
        summary, rows, info = _evaluate_task(config, codec, failures)
        originals, recons = info["previews"]  # what the base layer alone shows
        data = info["data"]
        base_config = codec.model_args.get("base", {})
        params.update({"alpha": stored.get("alpha"), "N": stored.get("N"), "M": stored.get("M")})
        tags.update({"task": info["task"], "layer": codec.kind, "alpha": str(stored.get("alpha")),
                     "task_network": str(base_config.get("task_network",
                                                         codec.model_args.get("task_network",
                                                                              "latent")))})
        if codec.kind == "scalable":
            from taskcodec.codecs.scalable import method_of, method_tags

            method = method_of(codec.model_args)
            tags.update({"method": method, "target": info["target"], **method_tags(method)})
            tags.update(base_tags(str(stored.get("base_run", "")),
                                  str(codec.model_args.get("base_fingerprint", "")), uri))
            tags["beta"] = str(base_config.get("beta", stored.get("beta", "")))
        else:
            tags.update({"method": f"base-{info['task']}-beta{float(stored.get('beta', 0)):g}",
                         "beta": str(stored.get("beta", ""))})
    params.update({k: data[k] for k in ("data", "split", "images", "data_digest")})
    tags.update({"data_name": data["data_name"], "data_digest": data["data_digest"]})
    if failures:
        tags["failed_images"] = str(len(failures))
    evaluated_run = config.checkpoint if len(config.checkpoint) == 32 else ""
    model = None
    if model_registry.is_model_uri(config.checkpoint):  # a registered model: its run and model
        model = model_registry.resolve(config.checkpoint, uri)
        evaluated_run = model.run_id
        tags.update({"evaluated_model": f"{model.name}/{model.version}",
                     "evaluated_model_id": model.model_id})
    if evaluated_run:
        tags["evaluated_run_id"] = evaluated_run
    active = mlflow.active_run()
    started = active is None or nested
    run_name = f"{config.run_name}-rate{rate}" if config.run_name and rate is not None \
        else config.run_name
    if nested:
        active = mlflow.start_run(run_name=run_name or None, nested=True)
    elif started:
        active = tracking.start_run(run_name)
    try:
        client = mlflow.tracking.MlflowClient(uri)
        already = client.get_run(active.info.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in already})
        mlflow.set_tags(tags)
        tracking.log_datasets(client, active.info.run_id, [(data, "evaluation")])
        # With the logged model's id, the results also show on the model's page, per data set.
        linked = {"model_id": model.model_id, "dataset": tracking.dataset_entity(data)} \
            if model and model.model_id else {}
        mlflow.log_metrics({k: v for k, v in summary.items() if v == v},  # NaN is not logged
                           **linked)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(out_dir) if out_dir else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            mlflow.log_artifact(str(_write_rows(rows, folder / "per_image.csv")), "evaluation")
            if originals:
                name = "reconstructions.png" if codec.kind == "codec" else "previews.png"
                mlflow.log_artifact(str(save_grid(originals, recons, folder / name)),
                                    "evaluation")
    finally:
        if started:
            mlflow.end_run()
    return {"run_id": active.info.run_id, "summary": summary, "results": rows,
            "codec": codec.name, "kind": codec.kind, "data": data, "failures": failures,
            "rate": rate}
