"""A trained codec ready to code real bitstreams: weights + entropy tables + identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskcodec import bitstream, checkpoints
from taskcodec.codecs.registry import build_codec
from taskcodec.data.transforms import crop_padding, pad_to_multiple
from taskcodec.errors import BitstreamError, CheckpointError

PAD_MULTIPLE = 64


@dataclass
class LoadedCodec:
    name: str
    model: nn.Module
    fingerprint: str
    config: dict[str, Any]
    source: str

    def compress(self, x: torch.Tensor) -> bytes:
        """One image (3xHxW or 1x3xHxW, in [0, 1]) -> the bytes of a taskcodec file."""
        x = x if x.dim() == 4 else x.unsqueeze(0)
        if x.shape[0] != 1:
            raise ValueError(f"compress takes one image at a time, got a batch of {x.shape[0]}")
        height, width = x.shape[-2:]
        padded, _ = pad_to_multiple(x, PAD_MULTIPLE)
        with torch.no_grad():
            out = self.model.compress(padded)
        header = bitstream.Header(self.name, self.fingerprint, int(height), int(width))
        return bitstream.pack(header, [bitstream.Layer.from_compressed("main", out)])

    def decompress(self, data: bytes) -> torch.Tensor:
        """The bytes of a taskcodec file -> the reconstruction, 1x3xHxW in [0, 1]."""
        header, layers = bitstream.unpack(data)
        bitstream.check_checkpoint(header, self.fingerprint, self.name)
        if [layer.name for layer in layers] != ["main"]:
            raise BitstreamError(f"this is a {len(layers)}-layer bitstream "
                                 f"({', '.join(l.name for l in layers)}); {self.name} writes one "
                                 "layer named 'main'")
        layer = layers[0]
        try:
            with torch.no_grad():
                x_hat = self.model.decompress(**layer.to_compressed())["x_hat"]
        except Exception as err:  # malformed shapes that still passed the CRC
            raise BitstreamError(f"cannot decode layer 'main': {str(err).splitlines()[0][:160]}") \
                from None
        # The padding pad_to_multiple applied to an image of the header's size.
        padded, pads = pad_to_multiple(torch.empty(1, 0, header.height, header.width),
                                       PAD_MULTIPLE)
        if tuple(x_hat.shape[-2:]) != tuple(padded.shape[-2:]):
            raise BitstreamError(f"decoded size {tuple(x_hat.shape[-2:])} does not match the "
                                 f"header's {header.height}x{header.width} image")
        return crop_padding(x_hat, pads).clamp_(0, 1)


def load_codec(ref: str, which: str = "best", cache: Path | None = None) -> LoadedCodec:
    """Load a codec from a checkpoint path or an MLflow run id, with its entropy tables built."""
    path = checkpoints.resolve(ref, which, cache)
    ckpt = checkpoints.load(path)
    config = ckpt["config"]
    try:
        model = build_codec(ckpt.get("codec", config.get("codec")), N=int(config["N"]),
                            M=int(config["M"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its codec: "
                              f"{str(err).splitlines()[0][:160]}") from None
    model.eval()
    model.update(force=True)
    fingerprint = ckpt.get("fingerprint") or bitstream.checkpoint_fingerprint(ckpt["model"])
    return LoadedCodec(name=config["codec"], model=model, fingerprint=fingerprint, config=config,
                       source=str(ref))
