"""Memory-safe entropy decoding of untrusted strings, and a digest of the coded symbols.

Why not CompressAI's own decoder. ``compressai.ans.RansDecoder.decode_with_indexes`` (C++,
ryg_rans' ``rans64.h``) reads the string as 32-bit words through a raw pointer and never
compares that pointer with the string's end: the initial state takes two words whatever the
length, every symbol may take one more word, and a bypass-coded symbol (an outlier beyond its
CDF) reads a count of 4-bit groups from the stream and then that many groups, each possibly one
more word. A crafted string therefore makes it read past its buffer for as long as the bytes it
finds there say so (CompressAI issue #300: a segfault on corrupted strings). Padding cannot fix
that within a reasonable size: the number of words a crafted string can make it read grows
with the data it reads, not only with the number of symbols. Validating the string before the
native call would need the decode itself. Decoding in a child process is safe but costs a
process (and model) per file.

So untrusted strings are decoded here, in Python: the same arithmetic as the C++ decoder
(the output is identical for every string CompressAI's encoder writes - tested), with every
read checked against the string's length, the bypass length bounded by what a 32-bit value
needs, and two end-of-stream checks the native decoder skips: after the last symbol the rANS
state must be back at the encoder's initial value and every word must have been read. Both
hold for any honest string and fail for almost every damaged or desynchronised one. Python
ints cannot overflow, and nothing is indexed by a value read from the file. The cost is decode
time (a few microseconds per symbol instead of a few nanoseconds; ``make bench`` measures it);
encoding, and decoding strings this process has just encoded itself, still use the native
coder. The autoregressive models (``mbt2018``, ``cheng2020-*``) decode their ``y`` in steps,
one latent position at a time, through the same decoder (:class:`RansStream`).

The native encoder has a flaw of its own: a symbol too far outside its table makes it loop
forever (see :func:`check_codable`), so every symbol is checked before it is encoded.

:func:`install` puts a :class:`SafeEntropyCoder` in every CompressAI entropy model of a module;
the returned :class:`CodingSession` also keeps a short digest of the symbols coded within
:meth:`CodingSession.encoding` / :meth:`CodingSession.decoding`, which the bitstream stores per
layer so that a decoder whose entropy parameters differ from the encoder's (another CPU or GPU
rounding the hyper-decoder's output differently) is refused instead of writing garbage.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from compressai import ans
from compressai.entropy_models import EntropyModel
from torch import nn

from taskcodec.errors import DesyncError, EncodeError

PRECISION = 16  # CompressAI's entropy_coder_precision (its C++ decoder hard-codes 16)
BYPASS_BITS = 4
MAX_BYPASS_GROUPS = 8  # 8 groups of 4 bits hold any 32-bit raw value: more is corruption
#: How far outside its table (symbol - offset below 0, or above the table's top) a symbol may
#: lie for the native encoder to return: its bypass value 2 * distance must stay below 2^28.
MAX_OUTLIER = 1 << 27
RANS64_L = 1 << 31  # lower bound of the normalised state interval; the encoder starts here
DIGEST_SIZE = 4  # bytes of the per-layer symbol digest
DESYNC_ADVICE = ("this decoder's entropy parameters differ from the encoder's (another kind of "
                 "CPU/GPU or library rounds the hyper-decoder differently); decode on the same "
                 "kind of device as the encoder, or use a deterministic integer "
                 "entropy-parameter path")


def rans_decode(string: bytes, indexes: Sequence[int], cdfs: Sequence[Sequence[int]],
                cdf_sizes: Sequence[int], offsets: Sequence[int]) -> list[int]:
    """CompressAI's ``RansDecoder.decode_with_indexes``, memory-safe and end-checked.

    ``indexes`` pick a CDF per symbol; ``cdfs``, ``cdf_sizes`` and ``offsets`` are the entropy
    model's tables (from the checkpoint's weights, trusted). Any inconsistency of ``string``
    is a :class:`DesyncError` (a :class:`BitstreamError`).
    """
    stream = RansStream(string, cdfs, cdf_sizes, offsets)
    out = stream.decode(indexes)
    stream.close()
    return out


class RansStream:
    """:func:`rans_decode` in steps, like CompressAI's ``set_stream`` + ``decode_stream``: an
    autoregressive model learns the indexes of its next symbols from those decoded so far.

    Each step is as memory-safe as :func:`rans_decode`; :meth:`close` makes the end-of-stream
    checks. ``record`` is given each step's symbols (the layer's digest).
    """

    def __init__(self, string: bytes, cdfs: Sequence[Sequence[int]], cdf_sizes: Sequence[int],
                 offsets: Sequence[int], record: Callable[[list[int]], None] | None = None
                 ) -> None:
        n = len(string)
        if n < 8 or n % 4:
            raise _undecodable(f"{n} bytes is not a whole number (at least 2) of 32-bit words")
        self._words = np.frombuffer(string, dtype="<u4").tolist()
        self._x = self._words[0] | (self._words[1] << 32)
        self._pos = 2
        self._decoded = 0
        self._tables = (cdfs, cdf_sizes, offsets)
        self._record = record

    def decode(self, indexes: Sequence[int]) -> list[int]:
        """The next ``len(indexes)`` symbols, ``indexes`` picking each one's CDF."""
        cdfs, cdf_sizes, offsets = self._tables
        words, x, pos, first = self._words, self._x, self._pos, self._decoded
        nwords = len(words)
        mask = (1 << PRECISION) - 1
        bypass_mask = (1 << BYPASS_BITS) - 1
        out = [0] * len(indexes)

        def refill(x: int) -> int:  # only on the rare renormalisations of bypass reads
            nonlocal pos
            if pos >= nwords:
                raise _undecodable("it ends before its last symbol")
            x = (x << 32) | words[pos]
            pos += 1
            return x

        for i, idx in enumerate(indexes):
            cdf = cdfs[idx]
            size = cdf_sizes[idx]
            cum = x & mask
            s = bisect_right(cdf, cum, 0, size) - 1  # CDFs strictly increase: same as find_if
            start = cdf[s]
            x = (cdf[s + 1] - start) * (x >> PRECISION) + cum - start
            if x < RANS64_L:
                if pos >= nwords:
                    raise _undecodable("it ends before its last symbol")
                x = (x << 32) | words[pos]
                pos += 1
            value = s
            max_value = size - 2
            if s == max_value:  # bypass: the symbol lies outside the CDF's range
                groups = 0
                while True:
                    val = x & bypass_mask
                    x >>= BYPASS_BITS
                    if x < RANS64_L:
                        x = refill(x)
                    groups += val
                    if groups > MAX_BYPASS_GROUPS:
                        raise _undecodable(f"symbol {first + i} claims {groups}+ bypass groups "
                                           f"(at most {MAX_BYPASS_GROUPS})")
                    if val != bypass_mask:
                        break
                raw = 0
                for j in range(groups):
                    raw |= (x & bypass_mask) << (j * BYPASS_BITS)
                    x >>= BYPASS_BITS
                    if x < RANS64_L:
                        x = refill(x)
                if raw >= 1 << 31:  # the C++ decoder holds it in an int32
                    raise _undecodable(f"symbol {first + i} is out of range")
                value = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + max_value
            out[i] = value + offsets[idx]
        self._x, self._pos, self._decoded = x, pos, first + len(out)
        if self._record is not None:
            self._record(out)
        return out

    def close(self) -> None:
        """Refuse a string that does not end where its encoder began."""
        nwords = len(self._words)
        if self._x != RANS64_L or self._pos != nwords:
            raise _undecodable(f"the decoder did not end where the encoder began "
                               f"({nwords - self._pos} of {nwords} words unread)")


def _undecodable(what: str) -> DesyncError:
    # The layer's CRC matched before decoding began: the string is what its writer wrote.
    return DesyncError(f"entropy-coded string does not decode: {what}; either a faulty or hostile "
                       f"writer made it, or {DESYNC_ADVICE}")


def check_codable(symbols: Sequence[int], indexes: Sequence[int], cdf_sizes: Sequence[int],
                  offsets: Sequence[int], where: str = "an entropy model") -> None:
    """Refuse symbols that CompressAI's native encoder would never finish coding.

    ``BufferedRansEncoder::encode_with_indexes`` (rans_interface.cpp) codes a symbol outside
    its table as a raw value, ``raw = -2v - 1`` below it and ``2(v - max)`` above it (``v`` =
    symbol - offset), in 4-bit groups counted by ``while ((raw >> (4 * n)) != 0) ++n``. For
    ``raw >= 2^28`` the count reaches 8, a shift by 32 bits (undefined in C++; x86 takes it
    modulo 32, so it shifts by 0), and no shift ever gives 0: the loop never ends.
    A latent of untrained, diverged or corrupt weights gets there (a NaN becomes -2^31).
    CompressAI's Python side bounds the scales (``lower_bound_scale``), never the symbols.
    """
    if not len(symbols):
        return
    if (min(symbols) - max(offsets) >= -MAX_OUTLIER
            and max(symbols) - min(offsets) < MAX_OUTLIER):
        return  # every symbol is near enough: decided without numpy
    values = np.asarray(symbols, dtype=np.int64) - np.asarray(offsets, dtype=np.int64)[indexes]
    tops = np.asarray(cdf_sizes, dtype=np.int64)[indexes] - 2
    outside = np.where(values < 0, -values, values - tops + 1)  # raw ~ 2 * outside
    bad = np.flatnonzero(outside > MAX_OUTLIER)
    if bad.size:
        raise EncodeError(
            f"cannot entropy-code this image: symbol {int(symbols[int(bad[0])])} of {where} "
            f"({bad.size} such) lies over 2^27 outside its table, beyond what CompressAI's rANS "
            "encoder can code; the model's latent is not finite or has diverged (untrained or "
            "corrupt weights?)")


class CodingSession:
    """Shared by the entropy models of one layer: who may decode natively, and the digest.

    Outside :meth:`encoding` every decode is of an untrusted string (the safe decoder).
    """

    def __init__(self) -> None:
        self._mode: str | None = None
        self._hash: hashlib.blake2b | None = None

    @contextmanager
    def encoding(self) -> Iterator[CodingSession]:
        """Code our own image: encoded symbols feed the digest; the encoder's own re-decodes
        (``compress`` decodes z to find y's parameters) use the native decoder."""
        with self._session("encode"):
            yield self

    @contextmanager
    def decoding(self) -> Iterator[CodingSession]:
        """Decode a file: decoded symbols feed the digest."""
        with self._session("decode"):
            yield self

    @contextmanager
    def _session(self, mode: str) -> Iterator[None]:
        self._mode, self._hash = mode, hashlib.blake2b(digest_size=DIGEST_SIZE)
        try:
            yield
        finally:
            self._mode = None

    def digest(self) -> bytes:
        """The digest of the symbols coded in the last session (in coding order)."""
        if self._hash is None:
            raise RuntimeError("no symbols were coded yet")
        return self._hash.digest()

    def _record(self, mode: str, symbols: Sequence[int]) -> None:
        if self._mode == mode:
            self._hash.update(np.asarray(symbols, dtype="<i4").tobytes())


class SafeEntropyCoder:
    """Stands in for CompressAI's ``_EntropyCoder`` proxy (same two methods, same name), plus
    :meth:`stream` for the autoregressive models' decoding in steps."""

    name = "ans"  # what EntropyModel.__getstate__ pickles

    def __init__(self, session: CodingSession, where: str = "an entropy model") -> None:
        self.session = session
        self.where = where  # the entropy model's name in its module, for messages
        self._encoder = ans.RansEncoder()
        self._decoder = ans.RansDecoder()

    def encode_with_indexes(self, symbols, indexes, cdfs, cdf_sizes, offsets) -> bytes:
        check_codable(symbols, indexes, cdf_sizes, offsets, self.where)
        self.session._record("encode", symbols)
        return self._encoder.encode_with_indexes(symbols, indexes, cdfs, cdf_sizes, offsets)

    def decode_with_indexes(self, string, indexes, cdfs, cdf_sizes, offsets) -> list[int]:
        if self.session._mode == "encode":  # a string this process just wrote: trusted
            return self._decoder.decode_with_indexes(string, indexes, cdfs, cdf_sizes, offsets)
        stream = self.stream(string, cdfs, cdf_sizes, offsets)
        values = stream.decode(indexes)
        stream.close()
        return values

    def stream(self, string, cdfs, cdf_sizes, offsets) -> RansStream:
        """A safe decoder of ``string`` in steps, whose symbols join the decoding digest."""
        return RansStream(string, cdfs, cdf_sizes, offsets,
                          record=lambda values: self.session._record("decode", values))


def open_stream(model: EntropyModel, string: bytes, cdfs, cdf_sizes, offsets) -> RansStream:
    """A safe decoder of ``string`` in steps with ``model``'s tables; its symbols join the
    layer's digest when :func:`install` gave ``model`` a coding session."""
    coder = model.entropy_coder
    if isinstance(coder, SafeEntropyCoder):
        return coder.stream(string, cdfs, cdf_sizes, offsets)
    return RansStream(string, cdfs, cdf_sizes, offsets)


def install(module: nn.Module) -> CodingSession:
    """Make every entropy model in ``module`` decode safely; return their shared session."""
    session = CodingSession()
    found = 0
    for name, sub in module.named_modules():
        if isinstance(sub, EntropyModel):
            sub.entropy_coder = SafeEntropyCoder(session, name or type(sub).__name__)
            found += 1
    if not found:
        raise ValueError(f"{type(module).__name__} has no CompressAI entropy model")
    return session
