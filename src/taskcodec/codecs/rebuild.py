"""Rebuilding a model from what a checkpoint stores about it (``model_args``).

Every checkpoint carries the arguments its model was built with; this module is the one place
that turns them back into a module, so that decoding (:mod:`taskcodec.codecs.loading`) and
training (:mod:`taskcodec.recipes`) build the same architecture from the same dict:

* ``{"kind": "codec", "codec", "N", "M"}``: a single-layer CompressAI codec;
* ``{"kind": "base", "N", "M", "task", "entropy_model", "num_classes", "synthesis_head"}``
  (and, since the image-space networks and probes, ``task_network``, ``synthesis_width``,
  ``probe``, ``depth_target``, ``detection_min_size``, ``task_kwargs``);
* ``{"kind": "scalable", "base": {...base args...}, "N", "M", "method", "target",
  "num_classes", "condition_decoder"}`` (and the condition path's ``cond_*`` sizes): the base
  and its enhancement in one model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from taskcodec.errors import CheckpointError


def build_codec_model(args: dict[str, Any]) -> nn.Module:
    """A single-layer codec (untrained) from ``model_args`` of kind ``codec``."""
    from taskcodec.codecs import build_codec

    return build_codec(args["codec"], N=int(args["N"]), M=int(args["M"]))


def build_base(args: dict[str, Any]) -> nn.Module:
    """A task base layer (untrained) from ``model_args`` of kind ``base``."""
    from taskcodec.codecs.scalable import BaseModel

    # Checkpoints older than the image-space networks and probes lack those keys.
    return BaseModel(N=int(args["N"]), M=int(args["M"]), task=args["task"],
                     entropy_model=args["entropy_model"], num_classes=int(args["num_classes"]),
                     synthesis_head=bool(args["synthesis_head"]),
                     task_network=str(args.get("task_network", "latent")),
                     synthesis_width=int(args.get("synthesis_width", 0)),
                     probe=bool(args.get("probe", False)),
                     depth_target=str(args.get("depth_target", "depth")),
                     detection_min_size=int(args.get("detection_min_size", 0)),
                     task_kwargs=args.get("task_kwargs"))


def build_scalable(args: dict[str, Any], base: nn.Module | None = None) -> nn.Module:
    """A ScalableModel from checkpoint model_args (the base rebuilt when not given)."""
    from taskcodec.codecs.scalable import LEGACY_CONDITION, EnhancementModel, ScalableModel

    if base is None:
        base = build_base(args["base"])
    # Checkpoints from before the condition path was configurable: M wide, two 3x3 layers.
    condition = {"cond_channels": int(args.get("cond_channels", args["M"])),
                 **{k: int(args.get(k, v)) for k, v in LEGACY_CONDITION.items()}}
    enhancement = EnhancementModel(N=int(args["N"]), M=int(args["M"]),
                                   M_base=int(args["base"]["M"]), method=args["method"],
                                   target=args["target"], num_classes=int(args["num_classes"]),
                                   condition_decoder=bool(args.get("condition_decoder")),
                                   **condition)
    return ScalableModel(base, enhancement)


def build_from_args(args: dict[str, Any]) -> nn.Module:
    """Rebuild any checkpoint's model from its stored ``model_args``."""
    kind = args.get("kind", "codec")
    if kind == "codec":
        return build_codec_model(args)
    if kind == "base":
        return build_base(args)
    if kind == "scalable":
        return build_scalable(args)
    raise CheckpointError(f"unknown model kind {kind!r} in checkpoint")


def load_base(ref: str):
    """A trained base layer (frozen) and its checkpoint's config, from a run id or a path."""
    from taskcodec import checkpoints

    ckpt, _ = checkpoints.load_ref(ref, "best")
    args = ckpt.get("model_args") or {}
    if args.get("kind") != "base":
        raise CheckpointError(f"base_run={ref}: its checkpoint is a {args.get('kind', 'codec')} "
                              "model, not a train-base run")
    model = build_base(args)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
