"""The zoo's autoregressive context models, coded through taskcodec's entropy coder.

- mbt2018: Minnen, Ballé and Toderici, "Joint autoregressive and hierarchical priors for
  learned image compression" (NeurIPS 2018): the mean-scale hyperprior plus a masked 5x5
  convolution over the latent positions already coded.
- cheng2020-anchor, cheng2020-attn: Cheng, Sun, Takeuchi and Katto, "Learned image compression
  with discretized Gaussian mixture likelihoods and attention modules" (CVPR 2020), as
  CompressAI builds them: residual blocks (and, for -attn, attention modules) around the same
  context model, with one Gaussian per symbol; one size parameter N.

CompressAI's ``compress`` and ``decompress`` walk the latent positions in raster order, each
position's entropy parameters computed from the positions before it. They code ``y`` with
their own native ``BufferedRansEncoder`` and ``RansDecoder``, past the entropy model's coder:
no memory-safe decoding of an untrusted file, no symbol digest, no check of the symbols
(see :mod:`taskcodec.codecs.entropy`). The two position loops are redone here over the entropy
model's coder; one method computes a position's parameters for both, so the encoder and the
decoder cannot drift apart. The bytes are those CompressAI writes, and its own decoder reads
them (tested). Decoding is serial by nature: a position waits for those above and left of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressai import models
from compressai.entropy_models import GaussianConditional
from compressai.layers import MaskedConv2d
from torch import Tensor

from taskcodec.codecs import entropy


class SerialContextCoding:
    """The position loops of CompressAI's ``JointAutoregressiveHierarchicalPriors``, over the
    Gaussian conditional's coder (mixed in before a CompressAI context model).

    Its ``compress`` and ``decompress`` (compressai 1.2.8, pinned) call ``_compress_ar`` and
    ``_decompress_ar`` once per image with these arguments; the rest of them is kept.
    """

    context_prediction: MaskedConv2d
    entropy_parameters: torch.nn.Module
    gaussian_conditional: GaussianConditional

    def _position_params(self, y_hat: Tensor, params: Tensor, h: int, w: int, kernel_size: int,
                         weight: Tensor) -> tuple[Tensor, Tensor]:
        """(scales, means), each 1xM, of position (h, w) of the padded ``y_hat``: from the
        positions before it (``weight`` is the masked context kernel) and the hyper-decoder's
        ``params``."""
        window = y_hat[:, :, h:h + kernel_size, w:w + kernel_size]
        context = F.conv2d(window, weight, bias=self.context_prediction.bias)
        hyper = params[:, :, h:h + 1, w:w + 1]
        scales, means = self.entropy_parameters(torch.cat((hyper, context), dim=1)).chunk(2, 1)
        return scales.flatten(1), means.flatten(1)

    def _tables(self) -> tuple[list, list, list]:
        gc = self.gaussian_conditional
        return gc.quantized_cdf.tolist(), gc.cdf_length.tolist(), gc.offset.tolist()

    def _masked_weight(self) -> Tensor:
        return self.context_prediction.weight * self.context_prediction.mask

    def _compress_ar(self, y_hat: Tensor, params: Tensor, height: int, width: int,
                     kernel_size: int, padding: int) -> bytes:
        gc = self.gaussian_conditional
        weight = self._masked_weight()
        symbols: list[int] = []
        indexes: list[int] = []
        for h in range(height):
            for w in range(width):
                scales, means = self._position_params(y_hat, params, h, w, kernel_size, weight)
                q = gc.quantize(y_hat[:, :, h + padding, w + padding], "symbols", means)
                y_hat[:, :, h + padding, w + padding] = gc.dequantize(q, means)
                symbols += q.flatten().tolist()
                indexes += gc.build_indexes(scales).flatten().tolist()
        return gc.entropy_coder.encode_with_indexes(symbols, indexes, *self._tables())

    def _decompress_ar(self, y_string: bytes, y_hat: Tensor, params: Tensor, height: int,
                       width: int, kernel_size: int, padding: int) -> None:
        gc = self.gaussian_conditional
        weight = self._masked_weight()
        stream = entropy.open_stream(gc, y_string, *self._tables())
        for h in range(height):
            for w in range(width):
                scales, means = self._position_params(y_hat, params, h, w, kernel_size, weight)
                values = stream.decode(gc.build_indexes(scales).flatten().tolist())
                q = torch.tensor(values, dtype=torch.int32).reshape(means.shape)
                y_hat[:, :, h + padding, w + padding] = gc.dequantize(q, means)
        stream.close()


class Mbt2018(SerialContextCoding, models.JointAutoregressiveHierarchicalPriors):
    """Minnen et al. 2018, joint autoregressive and hierarchical priors (sizes N, M)."""


class Cheng2020Anchor(SerialContextCoding, models.Cheng2020Anchor):
    """Cheng et al. 2020, anchor (size N: the latent has N channels too)."""


class Cheng2020Attention(SerialContextCoding, models.Cheng2020Attention):
    """Cheng et al. 2020, with attention modules (size N: the latent has N channels too)."""
