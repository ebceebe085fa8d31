"""The taskcodec compressed-file format: a small header, then the entropy-coded layers.

A file holds what ``model.compress(x)`` returned for one image, plus what a decoder must
know before it trusts those bytes: which codec and which weights made them (decoding with
other weights yields garbage, not an error) and the image size before padding.
A scalable codec stores several named layers ("base", "enhancement"); each layer has its
own CRC so a reader that wants only the base never checks (or needs) the enhancement bytes.

Byte layout, version 2 (``varint`` = unsigned LEB128, 1 byte below 128; ``u32`` = 4 bytes
little-endian; ``str`` = varint byte length + UTF-8)::

    offset  size    field
    0       4       magic b"TCDC"
    4       1       format version (2, or 3 for a variable-rate codec's file; 1 is still read)
    5       varint  B = length of the header body that follows
            B       header body:
                      str     codec registry name, e.g. "bmshj2018-factorized"
                      8       checkpoint id (the 16 hex chars of checkpoint_fingerprint, raw)
                      varint  height, varint width (image size before padding)
                      varint  version 3 only: rate point + 1 (0: none), for the variable-rate
                              codecs, whose decoder must use the encoder's rate
                      varint  L = number of layers, then L times:
                        str     layer name
                        varint  D = number of latent shape dims, then D varints
                        varint  S = number of strings (one per entropy model), then S varint lengths
                        u32     CRC-32 of this layer's payload (its S strings concatenated)
                        varint  K, then K bytes: digest of the layer's quantised symbols
                                (blake2b, K = 4; K = 0 when the writer recorded none).
                                Version 1 has no such field.
            4       u32 CRC-32 of every byte above (magic to the end of the header body)
            ...     payload: layer 1's strings, layer 2's strings, ... in header order

The file ends exactly after the last layer's payload; anything after it is an error.
Put the base layer first: a reader asking for the base only checks the header and the base
payload, so it still decodes a file whose later layers are corrupt or were cut off.
A typical single-layer header is about 65 bytes (a third of it the codec name): 0.65% of 10 KB.

The CRCs catch accidents; the symbol digest catches a decode that went wrong without any byte
being wrong: the same strings decoded with entropy parameters that differ from the encoder's
(another CPU or GPU rounding the hyper-decoder's output differently) give other symbols, and
the decoder refuses them (see :mod:`taskcodec.codecs.entropy`). Neither is a signature: anyone
can recompute both, so a decoder must still treat every byte as hostile.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskcodec.errors import BitstreamError

if TYPE_CHECKING:  # torch is only needed by checkpoint_fingerprint; keep CLI startup fast
    import torch

MAGIC = b"TCDC"
FORMAT_VERSION = 2
RATE_VERSION = 3  # written only for files with a rate: the others stay readable by older readers
READABLE_VERSIONS = (1, 2, 3)
_MAX_DIGEST_BYTES = 64

_CHECKPOINT_ID = re.compile(r"[0-9a-f]{16}")
_MAX_VARINT_BYTES = 10  # enough for 64 bits; longer means corruption, not a big number


@dataclass(frozen=True)
class Layer:
    """One layer's entropy-coded strings for one image, as ``compress`` made them."""

    name: str
    strings: tuple[bytes, ...]  # one bytes per entropy model (y, z, ...), batch item selected
    shape: tuple[int, ...]  # latent shape as CompressAI returns it
    digest: bytes = b""  # of the quantised symbols (format version 2); b"": none recorded

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"layer name must be a non-empty str, got {self.name!r}")
        if isinstance(self.strings, (bytes, bytearray, str)):
            raise ValueError(
                f"layer {self.name!r}: strings must be a sequence of bytes (one per entropy model), "
                f"got a single {type(self.strings).__name__}"
            )
        strings = tuple(self.strings)
        for s in strings:
            if not isinstance(s, (bytes, bytearray)):
                raise ValueError(f"layer {self.name!r}: every string must be bytes, got {type(s).__name__}")
        shape = tuple(_dim(d, self.name) for d in self.shape)
        if not isinstance(self.digest, (bytes, bytearray)) or len(self.digest) > _MAX_DIGEST_BYTES:
            raise ValueError(f"layer {self.name!r}: digest must be at most {_MAX_DIGEST_BYTES} "
                             f"bytes, got {self.digest!r:.40}")
        object.__setattr__(self, "digest", bytes(self.digest))
        # frozen: normalise lists / torch.Size / bytearray so equality and hashing behave
        object.__setattr__(self, "strings", tuple(bytes(s) for s in strings))
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_compressed(cls, name: str, compressed: Mapping[str, Any], item: int = 0) -> Layer:
        """The layer of batch item ``item`` in ``model.compress(x)``'s output."""
        strings = tuple(per_model[item] for per_model in compressed["strings"])
        return cls(name, strings, tuple(compressed["shape"]), compressed.get("digest", b""))

    def to_compressed(self) -> dict[str, Any]:
        """Arguments for ``model.decompress(**layer.to_compressed())`` (batch of one)."""
        return {"strings": [[s] for s in self.strings], "shape": self.shape}

    @property
    def payload_size(self) -> int:
        return sum(len(s) for s in self.strings)


@dataclass(frozen=True)
class Header:
    """What a decoder must know before it trusts the payload."""

    codec: str  # registry name, e.g. "bmshj2018-factorized"
    checkpoint_id: str  # 16 hex chars, see checkpoint_fingerprint
    height: int  # original image size (before padding)
    width: int
    rate: int | None = None  # rate point of a variable-rate codec (format version 3)

    def __post_init__(self) -> None:
        if not isinstance(self.codec, str) or not self.codec:
            raise ValueError(f"codec must be a non-empty str, got {self.codec!r}")
        cid = self.checkpoint_id.lower() if isinstance(self.checkpoint_id, str) else None
        if cid is None or not _CHECKPOINT_ID.fullmatch(cid):
            raise ValueError(f"checkpoint_id must be 16 hex characters, got {self.checkpoint_id!r}")
        object.__setattr__(self, "checkpoint_id", cid)
        for field in ("height", "width"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.rate is not None and (isinstance(self.rate, bool) or not isinstance(self.rate, int)
                                      or self.rate < 0):
            raise ValueError(f"rate must be a non-negative int or None, got {self.rate!r}")


def _dim(d: Any, layer: str) -> int:
    try:
        value = d.__index__()  # int, numpy ints, 0-d integer tensors; not floats
    except (AttributeError, TypeError):
        raise ValueError(f"layer {layer!r}: shape dims must be ints, got {d!r}") from None
    if isinstance(d, bool) or value < 0:
        raise ValueError(f"layer {layer!r}: shape dims must be non-negative ints, got {d!r}")
    return value


# --- writing ---------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _varint(len(raw)) + raw


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def _encode_header(header: Header, layers: Sequence[Layer], version: int = FORMAT_VERSION) -> bytes:
    if version not in READABLE_VERSIONS:
        raise ValueError(f"version must be one of {READABLE_VERSIONS}, got {version!r}")
    if not isinstance(header, Header):
        raise ValueError(f"header must be a Header, got {type(header).__name__}")
    if header.rate is not None and version == FORMAT_VERSION:
        version = RATE_VERSION
    if header.rate is not None and version < RATE_VERSION:
        raise ValueError(f"format version {version} cannot store a rate")
    layers = list(layers)
    if not layers:
        raise ValueError("a bitstream needs at least one layer, got none")
    names = [layer.name for layer in layers if isinstance(layer, Layer)]
    if len(names) != len(layers):
        raise ValueError(f"layers must be Layer objects, got {[type(x).__name__ for x in layers]}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"layer names must be unique, got {names} (repeated: {duplicates})")

    body = bytearray()
    body += _str(header.codec)
    body += bytes.fromhex(header.checkpoint_id)
    body += _varint(header.height) + _varint(header.width)
    if version >= RATE_VERSION:
        body += _varint(0 if header.rate is None else header.rate + 1)
    body += _varint(len(layers))
    for layer in layers:
        body += _str(layer.name)
        body += _varint(len(layer.shape)) + b"".join(_varint(d) for d in layer.shape)
        body += _varint(len(layer.strings)) + b"".join(_varint(len(s)) for s in layer.strings)
        body += _u32(zlib.crc32(b"".join(layer.strings)))
        if version >= 2:
            body += _varint(len(layer.digest)) + layer.digest
        elif layer.digest:
            raise ValueError(f"layer {layer.name!r}: format version 1 cannot store a symbol digest")
    head = MAGIC + bytes([version]) + _varint(len(body)) + bytes(body)
    return head + _u32(zlib.crc32(head))


def pack(header: Header, layers: Sequence[Layer], *, version: int = FORMAT_VERSION) -> bytes:
    """The file bytes for ``header`` and ``layers`` (stored in the order given: base first).

    ``version=1`` writes the previous format (no symbol digests), for compatibility tests.
    A header with a rate is written as version 3.
    """
    head = _encode_header(header, layers, version)
    return head + b"".join(s for layer in layers for s in layer.strings)


def header_size(header: Header, layers: Sequence[Layer]) -> int:
    """Bytes of the file that are not entropy-coded payload (the format's rate overhead)."""
    return len(_encode_header(header, layers))


def write(path: str | os.PathLike[str], header: Header, layers: Sequence[Layer]) -> int:
    """Write the file atomically (temp file + ``os.replace``); return the bytes written.

    Packing happens first, so bad arguments leave an existing file untouched; a crash while
    writing leaves either the old file or the new one, never half of one.
    """
    return write_bytes(path, pack(header, layers))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> int:
    """Write already packed bytes atomically; return how many were written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open (not mkstemp) so the file gets the usual umask permissions, not 0600
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise BitstreamError(f"cannot write bitstream {str(path)!r}: {e.strerror or e}") from e
    return len(data)


# --- reading ---------------------------------------------------------------------------


class _Reader:
    """Reads fields from ``data`` and turns every shortfall into one BitstreamError line."""

    def __init__(self, data: bytes, pos: int = 0, where: str = "bitstream") -> None:
        self.data, self.pos, self.where = data, pos, where

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise BitstreamError(
                f"truncated {self.where}: {what} needs {n} bytes at offset {self.pos}, "
                f"only {max(self.remaining, 0)} available"
            )
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def varint(self, what: str) -> int:
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value
        raise BitstreamError(
            f"corrupt {self.where}: {what} at offset {self.pos} is a varint longer than {_MAX_VARINT_BYTES} bytes"
        )

    def count(self, what: str) -> int:
        # each counted item takes at least one byte, so a bigger count cannot be honest
        n = self.varint(what)
        if n > self.remaining:
            raise BitstreamError(
                f"corrupt {self.where}: {what} is {n} but only {self.remaining} bytes are left"
            )
        return n

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def text(self, what: str) -> str:
        raw = self.take(self.varint(f"length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BitstreamError(f"corrupt {self.where}: {what} is not UTF-8 ({raw[:32]!r})") from None


@dataclass(frozen=True)
class _Entry:
    """A layer as the header describes it, before its payload is read."""

    name: str
    shape: tuple[int, ...]
    lengths: tuple[int, ...]
    crc: int
    digest: bytes


def _parse_header(data: bytes) -> tuple[Header, list[_Entry], int]:
    """Header, layer entries and the payload's start offset; checks magic, version and CRC."""
    if len(data) == 0:
        raise BitstreamError("not a taskcodec bitstream: it is empty (0 bytes)")
    magic = bytes(data[: len(MAGIC)])
    if magic != MAGIC:
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            raise BitstreamError(
                f"truncated bitstream: magic needs {len(MAGIC)} bytes, only {len(magic)} available"
            )
        raise BitstreamError(f"not a taskcodec bitstream (magic {magic!r}, expected {MAGIC!r})")
    r = _Reader(data, len(MAGIC))
    version = r.take(1, "format version")[0]
    if version not in READABLE_VERSIONS:
        raise BitstreamError(
            f"unsupported taskcodec bitstream version {version} (this reader supports versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; a newer taskcodec may read it)"
        )
    body_size = r.varint("header length")
    body = r.take(body_size, "header")
    crc_end = r.pos
    if r.u32("header CRC") != zlib.crc32(bytes(data[:crc_end])):
        raise BitstreamError("corrupt bitstream: header CRC mismatch")

    # The CRC matched, so what follows only fails on files a buggy or hostile writer made.
    b = _Reader(body, where="header")
    codec = b.text("codec name")
    checkpoint_id = b.take(8, "checkpoint id").hex()
    height, width = b.varint("height"), b.varint("width")
    rate = b.varint("rate") - 1 if version >= RATE_VERSION else -1
    entries = []
    for i in range(b.count("number of layers")):
        name = b.text(f"name of layer {i}")
        ndims = b.count(f"dims of layer {name!r}")
        shape = tuple(b.varint(f"shape of layer {name!r}") for _ in range(ndims))
        nstrings = b.count(f"strings of layer {name!r}")
        lengths = tuple(b.varint(f"string length in layer {name!r}") for _ in range(nstrings))
        crc = b.u32(f"CRC of layer {name!r}")
        digest = b""
        if version >= 2:
            size = b.count(f"digest size of layer {name!r}")
            if size > _MAX_DIGEST_BYTES:
                raise BitstreamError(f"corrupt header: digest of layer {name!r} is {size} bytes "
                                     f"(at most {_MAX_DIGEST_BYTES})")
            digest = b.take(size, f"digest of layer {name!r}")
        entries.append(_Entry(name, shape, lengths, crc, digest))
    if b.remaining:
        raise BitstreamError(f"corrupt header: {b.remaining} unexpected bytes after the last layer")
    names = [e.name for e in entries]
    if not entries or len(set(names)) != len(names):
        raise BitstreamError(f"corrupt header: needs one or more uniquely named layers, got {names}")
    try:
        header = Header(codec, checkpoint_id, height, width, None if rate < 0 else rate)
    except ValueError as e:
        raise BitstreamError(f"corrupt header: {e}") from None
    return header, entries, r.pos


def _wanted(layers: Collection[str] | None) -> frozenset[str] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)):
        # "base" would otherwise be read as the layers {"b", "a", "s", "e"}
        raise ValueError(f"layers must be a collection of layer names, not the single name {layers!r}")
    return frozenset(layers)


def unpack(
    data: bytes, *, layers: Collection[str] | None = None
) -> tuple[Header, list[Layer]]:
    """Header and layers of a file's bytes.

    ``layers=None`` reads and checks every layer, and the data must end exactly after the
    last one. ``layers={"base"}`` returns only those (in file order) and checks only their
    CRCs: the other layers' payload may be corrupt or cut off, but the header must be intact.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)  # no copy when it already is bytes
    wanted = _wanted(layers)
    header, entries, offset = _parse_header(data)
    names = [e.name for e in entries]
    if wanted is not None:
        unknown = sorted(wanted - set(names))
        if unknown:
            raise BitstreamError(
                f"layer {unknown[0]!r} is not in this bitstream (it has: {', '.join(map(repr, names))})"
            )

    total = offset + sum(sum(e.lengths) for e in entries)
    if len(data) > total:
        raise BitstreamError(
            f"corrupt bitstream: {len(data) - total} bytes of trailing garbage "
            f"(expected {total} bytes, found {len(data)})"
        )
    if wanted is None and len(data) < total:
        raise BitstreamError(f"truncated bitstream: expected {total} bytes, only {len(data)} available")

    r = _Reader(data, offset)
    out = []
    for e in entries:
        size = sum(e.lengths)
        if wanted is not None and e.name not in wanted:
            r.pos += size  # never touched: may be corrupt or missing
            continue
        payload = r.take(size, f"payload of layer {e.name!r}")
        if zlib.crc32(payload) != e.crc:
            raise BitstreamError(f"corrupt bitstream: CRC mismatch in layer {e.name!r}")
        strings, start = [], 0
        for n in e.lengths:
            strings.append(payload[start : start + n])
            start += n
        out.append(Layer(e.name, tuple(strings), e.shape, e.digest))
    return header, out


def read(
    path: str | os.PathLike[str], *, layers: Collection[str] | None = None
) -> tuple[Header, list[Layer]]:
    """:func:`unpack` a file; errors name the file."""
    _wanted(layers)  # a bad argument is a ValueError, not a file problem
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BitstreamError(f"cannot read bitstream {str(path)!r}: {e.strerror or e}") from e
    try:
        return unpack(data, layers=layers)
    except BitstreamError as e:
        raise BitstreamError(f"{str(path)!r}: {e}") from None


def check_checkpoint(header: Header, checkpoint_id: str, codec: str) -> None:
    """Refuse to decode with weights other than those that encoded (garbage, not an error)."""
    if header.checkpoint_id != checkpoint_id.lower() or header.codec != codec:
        raise BitstreamError(
            f"bitstream was made with checkpoint {header.checkpoint_id} of codec {header.codec!r}, "
            f"this is checkpoint {checkpoint_id} of codec {codec!r}"
        )


def checkpoint_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """16 hex chars of sha256 over names, dtypes, shapes and bytes, in sorted name order.

    Include the entropy models' CDF buffers (as ``state_dict()`` does after ``update()``):
    they decide how bits decode, so two weight sets that differ only there are different.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        meta = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{raw.nbytes}\0".encode()
        h.update(_varint(len(meta)) + meta)
        h.update(raw)
    return h.hexdigest()[:16]
