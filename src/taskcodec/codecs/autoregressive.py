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

- mbt2018-vbr: Kamisli, Racapé and Choi (DCC 2024), mbt2018 at several rates with one set of
  weights: its position loops also take the rate point's gain (see :class:`Mbt2018Vbr`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressai import models
from compressai.entropy_models import GaussianConditional
from compressai.layers import MaskedConv2d
from compressai.models.vbr import JointAutoregressiveHierarchicalPriorsVbr
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
                         weight: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scales, means), each 1xM, of position (h, w) of the padded ``y_hat``: from the
        positions before it (``weight`` is the masked context kernel, ``shift`` a variable-rate
        model's term for its rate point) and the hyper-decoder's ``params``."""
        window = y_hat[:, :, h:h + kernel_size, w:w + kernel_size]
        context = F.conv2d(window, weight, bias=self.context_prediction.bias)
        if shift is not None:
            context = context + shift
        hyper = params[:, :, h:h + 1, w:w + 1]
        scales, means = self.entropy_parameters(torch.cat((hyper, context), dim=1)).chunk(2, 1)
        return scales.flatten(1), means.flatten(1)

    def _tables(self) -> tuple[list, list, list]:
        gc = self.gaussian_conditional
        return gc.quantized_cdf.tolist(), gc.cdf_length.tolist(), gc.offset.tolist()

    def _masked_weight(self) -> Tensor:
        return self.context_prediction.weight * self.context_prediction.mask

    # What a variable-rate model changes per position (its ``rate`` arguments: CompressAI's
    # gain, inverse gain and stage): a context shift, the symbols, the reconstruction, and
    # the scales the entropy coder's table is chosen by. A fixed-rate model has none.
    def _rate_shift(self, *rate) -> Tensor | None:
        return None

    def _symbols(self, y: Tensor, means: Tensor, *rate) -> Tensor:
        return self.gaussian_conditional.quantize(y, "symbols", means)

    def _reconstruct(self, q: Tensor, scales: Tensor, means: Tensor, *rate) -> Tensor:
        return self.gaussian_conditional.dequantize(q, means)

    def _coding_scales(self, scales: Tensor, *rate) -> Tensor:
        return scales

    def _compress_ar(self, y_hat: Tensor, params: Tensor, height: int, width: int,
                     kernel_size: int, padding: int, *rate) -> bytes:
        gc = self.gaussian_conditional
        weight, shift = self._masked_weight(), self._rate_shift(*rate)
        symbols: list[int] = []
        indexes: list[int] = []
        for h in range(height):
            for w in range(width):
                scales, means = self._position_params(y_hat, params, h, w, kernel_size, weight,
                                                      shift)
                q = self._symbols(y_hat[:, :, h + padding, w + padding], means, *rate)
                y_hat[:, :, h + padding, w + padding] = self._reconstruct(q, scales, means, *rate)
                symbols += q.int().flatten().tolist()
                indexes += gc.build_indexes(self._coding_scales(scales, *rate)).flatten().tolist()
        return gc.entropy_coder.encode_with_indexes(symbols, indexes, *self._tables())

    def _decompress_ar(self, y_string: bytes, y_hat: Tensor, params: Tensor, height: int,
                       width: int, kernel_size: int, padding: int, *rate) -> None:
        gc = self.gaussian_conditional
        weight, shift = self._masked_weight(), self._rate_shift(*rate)
        stream = entropy.open_stream(gc, y_string, *self._tables())
        for h in range(height):
            for w in range(width):
                scales, means = self._position_params(y_hat, params, h, w, kernel_size, weight,
                                                      shift)
                index = gc.build_indexes(self._coding_scales(scales, *rate))
                q = torch.tensor(stream.decode(index.flatten().tolist()),
                                 dtype=torch.float32).reshape(means.shape)
                y_hat[:, :, h + padding, w + padding] = self._reconstruct(q, scales, means, *rate)
        stream.close()


class Mbt2018(SerialContextCoding, models.JointAutoregressiveHierarchicalPriors):
    """Minnen et al. 2018, joint autoregressive and hierarchical priors (sizes N, M)."""


class Cheng2020Anchor(SerialContextCoding, models.Cheng2020Anchor):
    """Cheng et al. 2020, anchor (size N: the latent has N channels too)."""


class Cheng2020Attention(SerialContextCoding, models.Cheng2020Attention):
    """Cheng et al. 2020, with attention modules (size N: the latent has N channels too)."""


class Mbt2018Vbr(SerialContextCoding, JointAutoregressiveHierarchicalPriorsVbr):
    """Kamisli, Racapé and Choi, "Variable-Rate Learned Image Compression with Multi-Objective
    Optimization and Quantization-Reconstruction Offsets" (DCC 2024): mbt2018 whose latent is
    scaled by the rate point's gain before rounding, whose context is shifted by a learned
    function of that gain, and whose reconstruction is moved off the bin centre (QuantABCD).

    CompressAI's ``compress``/``decompress`` (1.2.8) call the two position loops with the
    gain, its inverse and the stage, which the hooks below apply; only its default path
    (stage 2, with offsets, ``ste_recursive``) is coded, the one its ``forward`` trains.
    The bytes are those CompressAI writes; its own decoder reads them once
    the context kernel is masked (its decoder, unlike its encoder, uses the raw kernel, which
    only a stage-1 forward masks in place).
    """

    def _rate_shift(self, scale: Tensor, rescale: Tensor, stage: int) -> Tensor:
        if stage != 2 or self.no_quantoffset or not self.ste_recursive:
            raise ValueError(f"{type(self).__name__} codes stage 2 with quantisation offsets "
                             f"only, not stage={stage}")
        return self.scale_to_context(scale.view(1, 1)).view(1, -1, 1, 1)

    def _symbols(self, y: Tensor, means: Tensor, scale: Tensor, *_) -> Tensor:
        centred = (y - means) * scale
        return torch.sign(centred) * torch.round(centred.abs())

    def _reconstruct(self, q: Tensor, scales: Tensor, means: Tensor, scale: Tensor,
                     rescale: Tensor, *_) -> Tensor:
        """y of integer symbols ``q`` (1xM): the bin centre moved by the learned offset."""
        q_abs, signs = q.abs(), torch.sign(q)
        stdev = self.gaussian_conditional.lower_bound_scale(scales * scale).unsqueeze(2)
        offsets = -self.QuantABCD(torch.cat((stdev, scale.expand(stdev.shape)), dim=2)).squeeze(2)
        offsets[q_abs < 0.0001] = 0  # a zero stays zero
        return signs * (q_abs + offsets) * rescale + means

    def _coding_scales(self, scales: Tensor, scale: Tensor, *_) -> Tensor:
        return scales * scale
