"""Codecs keep CompressAI's contract: ``forward`` -> {"x_hat", "likelihoods"},
``compress`` -> {"strings", "shape"}, ``decompress(strings, shape)`` -> {"x_hat"}."""

from taskcodec.codecs import single  # noqa: F401  (registers the single-layer codecs)
from taskcodec.codecs.registry import CODECS, build_codec

__all__ = ["CODECS", "build_codec"]
