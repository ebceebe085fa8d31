"""A trained model ready to code real bitstreams: weights + entropy tables + identity.

Three kinds of checkpoints code three kinds of files:

* ``codec`` (``train``): one layer named ``main``; decoding gives the reconstruction.
* ``base`` (``train-base``): one layer named ``base``; decoding runs the machine task.
* ``scalable`` (``train-enhancement``): layers ``base`` then ``enhancement``. Decoding the
  base alone runs the machine task without reading the enhancement bytes; decoding both also
  gives the assisted target (the reconstruction, or a segmentation).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from taskcodec import bitstream, checkpoints
from taskcodec.data.transforms import crop_padding, pad_to_multiple
from taskcodec.errors import BitstreamError, CheckpointError

PAD_MULTIPLE = 64


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


@dataclass
class LoadedCodec:
    name: str                    # written into the bitstream header
    kind: str                    # codec | base | scalable
    model: nn.Module
    fingerprint: str
    config: dict[str, Any]
    model_args: dict[str, Any]
    source: str

    @property
    def layer_names(self) -> tuple[str, ...]:
        return {"codec": ("main",), "base": ("base",),
                "scalable": ("base", "enhancement")}[self.kind]

    @property
    def task(self) -> str:
        args = self.model_args.get("base", self.model_args)
        return str(args.get("task", "reconstruction"))

    # -- encoding ------------------------------------------------------------------------------
    def compress(self, x: Tensor) -> bytes:
        """One image (3xHxW or 1x3xHxW, in [0, 1]) -> the bytes of a taskcodec file."""
        x = x if x.dim() == 4 else x.unsqueeze(0)
        if x.shape[0] != 1:
            raise ValueError(f"compress takes one image at a time, got a batch of {x.shape[0]}")
        height, width = (int(v) for v in x.shape[-2:])
        padded, _ = pad_to_multiple(x, PAD_MULTIPLE)
        with torch.no_grad():
            if self.kind == "scalable":
                out = self.model.compress(padded)["layers"]
                layers = [bitstream.Layer.from_compressed(name, {"strings": s, "shape": shape})
                          for name, (s, shape) in out.items()]
            else:
                out = self.model.compress(padded)
                layers = [bitstream.Layer.from_compressed(self.layer_names[0], out)]
        return bitstream.pack(bitstream.Header(self.name, self.fingerprint, height, width), layers)

    # -- decoding ------------------------------------------------------------------------------
    def read(self, data: bytes, layers: Collection[str] | None = None
             ) -> tuple[bitstream.Header, dict[str, bitstream.Layer]]:
        header, found = bitstream.unpack(data, layers=layers)
        bitstream.check_checkpoint(header, self.fingerprint, self.name)
        by_name = {layer.name: layer for layer in found}
        expected = set(self.layer_names if layers is None else layers)
        if set(by_name) != expected:
            raise BitstreamError(f"bitstream has layers {', '.join(sorted(by_name)) or 'none'}; "
                                 f"{self.name} writes {', '.join(self.layer_names)}")
        return header, by_name

    def decompress(self, data: bytes, layers: Collection[str] | None = None) -> dict[str, Any]:
        """Decode a file. ``layers={"base"}`` decodes only the base layer (machine task).

        Returns ``x_hat`` (1x3xHxW) when the file carries a reconstruction, ``task`` (the
        machine task's prediction at the image's size) when it carries a base layer, and
        ``logits`` for an enhancement serving segmentation.
        """
        header, by_name = self.read(data, layers)
        padded, pads = pad_to_multiple(torch.empty(1, 0, header.height, header.width),
                                       PAD_MULTIPLE)
        size = tuple(padded.shape[-2:])
        result: dict[str, Any] = {"header": header}
        try:
            with torch.no_grad():
                if self.kind == "codec":
                    x_hat = self.model.decompress(**by_name["main"].to_compressed())["x_hat"]
                    result["x_hat"] = self._crop(x_hat, size, pads).clamp_(0, 1)
                    return result
                base = self.model.base if self.kind == "scalable" else self.model
                y_hat_b = base.decompress(**by_name["base"].to_compressed())["y_hat"]
                result["task"] = _crop_task(base.run_task(y_hat_b, size), size, pads)
                if "enhancement" in by_name:
                    out = self.model.enhancement.decompress(
                        **by_name["enhancement"].to_compressed(), y_hat_b=y_hat_b)
                    for key, value in out.items():
                        result[key] = self._crop(value, size, pads)
        except BitstreamError:
            raise
        except Exception as err:  # malformed shapes that still passed the CRC
            raise BitstreamError(f"cannot decode this bitstream: {_first_line(err)}") from None
        return result

    @staticmethod
    def _crop(t: Tensor, size: tuple[int, int], pads) -> Tensor:
        if tuple(t.shape[-2:]) != size:
            raise BitstreamError(f"decoded size {tuple(t.shape[-2:])} does not match the "
                                 f"header's image (padded to {size})")
        return crop_padding(t, pads)


def _crop_task(prediction: Any, size: tuple[int, int], pads) -> Any:
    """Bring a task prediction made on the padded image back to the image's coordinates."""
    top, bottom, left, right = pads
    if isinstance(prediction, Tensor) and prediction.dim() == 4:
        return crop_padding(prediction, pads)
    if isinstance(prediction, list):  # detections
        height, width = size[0] - top - bottom, size[1] - left - right
        out = []
        for det in prediction:
            boxes = det["boxes"].clone()
            boxes[:, 0::2] = (boxes[:, 0::2] - left).clamp(0, width)
            boxes[:, 1::2] = (boxes[:, 1::2] - top).clamp(0, height)
            out.append({**det, "boxes": boxes})
        return out
    return prediction


def _header_name(args: dict[str, Any], config: dict[str, Any]) -> str:
    kind = args.get("kind", "codec")
    if kind == "codec":
        return str(args.get("codec") or config["codec"])
    if kind == "base":
        return f"base-{args['task']}"
    return f"scalable-{args['method']}-{args['target']}"


def load_codec(ref: str, which: str = "best") -> LoadedCodec:
    """Load a model from a checkpoint path or an MLflow run id, with its entropy tables built."""
    from taskcodec.codecs.rebuild import build_from_args

    ckpt, path = checkpoints.load_ref(ref, which)
    config = ckpt["config"]
    args = ckpt.get("model_args") or {"kind": "codec", "codec": config.get("codec"),
                                      "N": config.get("N"), "M": config.get("M")}
    try:
        model = build_from_args(args)
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its model: "
                              f"{_first_line(err)}") from None
    model.eval()
    model.update(force=True)
    fingerprint = ckpt.get("fingerprint") or bitstream.checkpoint_fingerprint(ckpt["model"])
    return LoadedCodec(name=_header_name(args, config), kind=args.get("kind", "codec"),
                       model=model, fingerprint=fingerprint, config=config, model_args=args,
                       source=str(ref))
