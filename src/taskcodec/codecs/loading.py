"""A trained model ready to code real bitstreams: weights + entropy tables + identity.

Three kinds of checkpoints code three kinds of files:

* ``codec`` (``train``): one layer named ``main``; decoding gives the reconstruction.
* ``base`` (``train-base``): one layer named ``base``; decoding runs the machine task.
* ``scalable`` (``train-enhancement``): layers ``base`` then ``enhancement``. Decoding the
  base alone runs the machine task without reading the enhancement bytes; decoding both also
  gives the assisted target (the reconstruction, or a segmentation).

A file is untrusted input. Before anything is allocated from it, its image size must be within
``max_pixels`` and every layer's latent shape and string count must be what this codec writes
for that image size; the strings are decoded by a memory-safe rANS decoder
(:mod:`taskcodec.codecs.entropy`); the decoded symbols must match the digest the encoder stored.
Every failure is one :class:`BitstreamError` line.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from taskcodec import bitstream, checkpoints
from taskcodec.codecs import entropy
from taskcodec.codecs.rebuild import build_from_args
from taskcodec.config import PAD_MULTIPLE
from taskcodec.data.transforms import crop_padding, pad_to_multiple
from taskcodec.errors import BitstreamError, CheckpointError, ConfigError, DesyncError

#: Largest image a file may ask to decode into (4096 x 4096), unless the caller allows more:
#: decoding allocates about (N + 3) * 4 bytes per pixel in the first synthesis layers.
MAX_PIXELS = 4096 * 4096
MAX_PIXELS_ENV = "TASKCODEC_MAX_PIXELS"
# An analysis transform halves the image four times (1/16); a hyper-analysis twice more (1/64).
LATENT_STRIDE, HYPER_STRIDE = 16, 64


def layer_layout(part: nn.Module, height: int, width: int) -> tuple[int, tuple[int, int]]:
    """(number of strings, latent shape) that ``part.compress`` writes for a padded image.

    Every entropy model of the part writes one string (y; y and z; ...). The shape is that of
    the latent decoded first, from which the others' follow: the model's own
    ``downsampling_factor`` where it declares one (every CompressAI zoo model: 16 for the
    factorized priors, 64 for the hyperpriors and context models), else z at 1/64 when a
    Gaussian conditional needs a hyperprior, y at 1/16 otherwise.
    """
    from compressai.entropy_models import EntropyModel, GaussianConditional

    models = [m for m in part.modules() if isinstance(m, EntropyModel)]
    stride = getattr(part, "downsampling_factor", None)
    if not isinstance(stride, int):
        hyper = any(isinstance(m, GaussianConditional) for m in models)
        stride = HYPER_STRIDE if hyper else LATENT_STRIDE
    return len(models), (height // stride, width // stride)


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
    # one coding session (safe decoder + symbol digest) per layer, over that layer's part
    sessions: dict[str, entropy.CodingSession] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sessions = {name: entropy.install(part) for name, part in self._parts().items()}

    def _parts(self) -> dict[str, nn.Module]:
        """The sub-module that codes each layer."""
        if self.kind == "scalable":
            return {"base": self.model.base, "enhancement": self.model.enhancement}
        return {self.layer_names[0]: self.model}

    def _sessions(self, names: Collection[str], mode: str) -> ExitStack:
        stack = ExitStack()
        for name in names:
            session = self.sessions[name]
            stack.enter_context(session.encoding() if mode == "encode" else session.decoding())
        return stack

    @property
    def layer_names(self) -> tuple[str, ...]:
        return {"codec": ("main",), "base": ("base",),
                "scalable": ("base", "enhancement")}[self.kind]

    @property
    def task(self) -> str:
        args = self.model_args.get("base", self.model_args)
        return str(args.get("task", "reconstruction"))

    @property
    def has_previews(self) -> bool:
        """Whether decoding with ``previews=True`` gives a preview or a prediction."""
        if self.kind == "codec":
            return False
        base = self.model.base if self.kind == "scalable" else self.model
        enhancement = getattr(self.model, "enhancement", None)
        return (base.task is not None and (base.probe is not None or base.g_s is not None)) \
            or getattr(enhancement, "predictor", None) is not None

    # -- encoding ------------------------------------------------------------------------------
    @property
    def default_rate(self) -> int | None:
        """The rate point :meth:`compress` codes at when given none (None: a fixed rate)."""
        from taskcodec.codecs.single import default_rate

        return default_rate(self.model)

    def rate_kwargs(self, rate: int | None, error: type[Exception] = ConfigError) -> dict:
        """What selects rate point ``rate`` in the model's calls ({} for a fixed-rate codec)."""
        from taskcodec.codecs.single import rate_kwargs

        return rate_kwargs(self.model, rate, self.name, error)

    def compress(self, x: Tensor, rate: int | None = None) -> bytes:
        """One image (3xHxW or 1x3xHxW, in [0, 1]) -> the bytes of a taskcodec file
        (``rate``: the rate point of a variable-rate codec, stored in the header)."""
        rate = self.default_rate if rate is None else rate
        kwargs = self.rate_kwargs(rate)
        x = x if x.dim() == 4 else x.unsqueeze(0)
        if x.shape[0] != 1:
            raise ValueError(f"compress takes one image at a time, got a batch of {x.shape[0]}")
        height, width = (int(v) for v in x.shape[-2:])
        padded, _ = pad_to_multiple(x, PAD_MULTIPLE)
        with torch.no_grad(), self._sessions(self.layer_names, "encode"):
            if self.kind == "scalable":
                out = self.model.compress(padded)["layers"]
            else:
                single = self.model.compress(padded, **kwargs)
                out = {self.layer_names[0]: (single["strings"], single["shape"])}
        layers = [bitstream.Layer.from_compressed(name, {"strings": s, "shape": shape,
                                                         "digest": self.sessions[name].digest()})
                  for name, (s, shape) in out.items()]
        return bitstream.pack(bitstream.Header(self.name, self.fingerprint, height, width, rate),
                              layers)

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

    def check_bounds(self, header: bitstream.Header, by_name: dict[str, bitstream.Layer],
                     max_pixels: int = MAX_PIXELS) -> tuple[tuple[int, int], tuple]:
        """Refuse a file whose sizes this codec would not write, before allocating from them.

        Returns the padded image size and the padding to crop.
        """
        pixels = header.height * header.width
        if pixels > max_pixels:
            raise BitstreamError(
                f"image size {header.width}x{header.height} ({pixels} pixels) is over this "
                f"decoder's limit of {max_pixels} pixels (raise it with --max-pixels or "
                f"${MAX_PIXELS_ENV} if you trust the file)")
        padded, pads = pad_to_multiple(torch.empty(1, 0, header.height, header.width),
                                       PAD_MULTIPLE)
        size = (int(padded.shape[-2]), int(padded.shape[-1]))
        parts = self._parts()
        for name, layer in by_name.items():
            count, shape = layer_layout(parts[name], *size)
            if len(layer.strings) != count or layer.shape != shape:
                raise BitstreamError(
                    f"layer {name!r} has {len(layer.strings)} strings of latent shape "
                    f"{layer.shape}; for a {header.width}x{header.height} image {self.name} "
                    f"writes {count} of shape {shape}")
        return size, pads

    def decompress(self, data: bytes, layers: Collection[str] | None = None, *,
                   previews: bool = False, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
        """Decode a file. ``layers={"base"}`` decodes only the base layer (machine task).

        Returns ``x_hat`` (1x3xHxW) when the file carries a reconstruction, ``task`` (the
        machine task's prediction at the image's size) when it carries a base layer, and
        ``logits`` for an enhancement serving segmentation. With ``previews``, also what the
        base layer alone shows a human: ``preview`` (the base's probe or synthesis head) and,
        for a residual enhancement, ``prediction`` (its predictor's image). A file whose image
        is larger than ``max_pixels`` is refused.
        """
        header, by_name = self.read(data, layers)
        size, pads = self.check_bounds(header, by_name, max_pixels)
        kwargs = self.rate_kwargs(header.rate, BitstreamError)
        result: dict[str, Any] = {"header": header}
        try:
            with torch.no_grad(), self._sessions(by_name, "decode"):
                compressed = {name: (layer.to_compressed()["strings"], layer.shape)
                              for name, layer in by_name.items()}
                if self.kind == "codec":
                    x_hat = self.model.decompress(*compressed["main"], **kwargs)["x_hat"]
                    result["x_hat"] = self._crop(x_hat, size, pads).clamp_(0, 1)
                else:
                    if self.kind == "scalable":
                        base = self.model.base
                        out = self.model.decompress(compressed)
                    else:
                        base = self.model
                        out = {"y_hat_b": base.decompress(*compressed["base"])["y_hat"]}
                    y_hat_b = out.pop("y_hat_b")
                    result["task"] = _crop_task(base.run_task(y_hat_b, size), size, pads)
                    if previews:
                        result.update(self._previews(base, y_hat_b, size, pads))
                    for key, value in out.items():
                        result[key] = self._crop(value, size, pads)
        except MemoryError:
            # Every size was checked above, so this is a limit below what max_pixels allows.
            # Other exceptions are not caught: after those checks they would be bugs, and the
            # fuzzer (tests/fuzz_decode.py) must see them.
            raise BitstreamError(f"decoding this {header.width}x{header.height} image needs "
                                 "more memory than this process may use") from None
        self._check_digests(by_name)
        return result

    def _previews(self, base: nn.Module, y_hat_b: Tensor, size: tuple[int, int], pads
                  ) -> dict[str, Tensor]:
        out = {}
        preview = base.preview(y_hat_b)
        if preview is not None:
            out["preview"] = self._crop(preview, size, pads)
        predictor = getattr(getattr(self.model, "enhancement", None), "predictor", None)
        if predictor is not None:
            out["prediction"] = self._crop(predictor(y_hat_b).clamp(0, 1), size, pads)
        return out

    def _check_digests(self, by_name: dict[str, bitstream.Layer]) -> None:
        for name, layer in by_name.items():
            got = self.sessions[name].digest()
            if layer.digest and got != layer.digest:
                raise DesyncError(
                    f"layer {name!r} decoded to other symbols than were encoded (symbol digest "
                    f"{got.hex()}, the file says {layer.digest.hex()}): "
                    f"{entropy.DESYNC_ADVICE}")

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


def header_name(args: dict[str, Any], config: dict[str, Any]) -> str:
    """The model name a bitstream header carries: the codec's registry name, ``base-TASK`` or
    ``scalable-METHOD-TARGET``, from the model args (a checkpoint's, or a model's in training;
    an old checkpoint's codec from its ``config``)."""
    kind = args.get("kind", "codec")
    if kind == "codec":
        return str(args.get("codec") or config["codec"])
    if kind == "base":
        return f"base-{args['task']}"
    return f"scalable-{args['method']}-{args['target']}"


def load_codec(ref: str, which: str = "best", codec: str = "") -> LoadedCodec:
    """Load a model from a checkpoint path, an MLflow run id or a CompressAI zoo name, with its
    entropy tables built (``codec``: the architecture of CompressAI weights, if not evident)."""
    ckpt, path = checkpoints.load_ref(ref, which, codec)
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
    return LoadedCodec(name=header_name(args, config), kind=args.get("kind", "codec"),
                       model=model, fingerprint=fingerprint, config=config, model_args=args,
                       source=str(ref))
