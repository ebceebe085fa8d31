import os
import zlib

import pytest
import torch
from compressai.models import FactorizedPrior

from taskcodec import bitstream
from taskcodec.bitstream import Header, Layer, pack, unpack
from taskcodec.errors import BitstreamError

HEADER = Header("bmshj2018-factorized", "0123456789abcdef", height=61, width=57)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = FactorizedPrior(N=8, M=8).eval()
    net.update(force=True)
    return net


@pytest.fixture(scope="module")
def compressed(model):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.compress(x)


@pytest.fixture(scope="module")
def two_layers(compressed):
    base = Layer.from_compressed("base", compressed)
    enhancement = Layer("enhancement", (b"\x01\x02\x03" * 7, b"", b"z" * 40), (2, 3, 5))
    return [base, enhancement]


def _decode(model, layer):
    with torch.no_grad():
        return model.decompress(**layer.to_compressed())["x_hat"]


def _varint(n):  # an independent encoder, so the layout test checks the documented format
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _file(body, version=1):
    head = b"TCDC" + bytes([version]) + _varint(len(body)) + body
    return head + zlib.crc32(head).to_bytes(4, "little")


def _body(layers, codec=b"c", ckpt=bytes(8), height=1, width=1):
    body = _varint(len(codec)) + codec + ckpt + _varint(height) + _varint(width) + _varint(len(layers))
    return body + b"".join(layers)


# --- round trips -----------------------------------------------------------------------


def test_round_trip_decodes_like_direct_decompress(model, compressed):
    data = pack(HEADER, [Layer.from_compressed("main", compressed)])
    header, (layer,) = unpack(data)
    assert header == HEADER
    assert layer.name == "main" and layer.shape == tuple(compressed["shape"])
    assert list(layer.strings) == [s[0] for s in compressed["strings"]]
    with torch.no_grad():
        direct = model.decompress(compressed["strings"], compressed["shape"])["x_hat"]
    assert torch.equal(_decode(model, layer), direct)


def test_multi_layer_round_trip_keeps_order_and_empty_strings(two_layers):
    header, layers = unpack(pack(HEADER, two_layers))
    assert header == HEADER
    assert layers == two_layers


def test_layout_matches_documented_format():
    layer = Layer("main", (b"yy", b"z"), (4, 300), digest=b"\xde\xad\xbe\xef")
    entry = b"\x04main" + b"\x02\x04" + _varint(300) + b"\x02\x02\x01"
    entry += zlib.crc32(b"yyz").to_bytes(4, "little")
    body = _body([entry + b"\x04\xde\xad\xbe\xef"], codec=b"abc",
                 ckpt=bytes.fromhex("0123456789abcdef"), height=61, width=200)
    header = Header("abc", "0123456789ABCDEF", 61, 200)
    assert pack(header, [layer]) == _file(body, version=2) + b"yyz"
    assert unpack(_file(body, version=2) + b"yyz") == (header, [layer])

    # version 1 (no digest field) is still written on request and read
    v1 = Layer("main", (b"yy", b"z"), (4, 300))
    body = _body([entry], codec=b"abc", ckpt=bytes.fromhex("0123456789abcdef"), height=61, width=200)
    assert pack(header, [v1], version=1) == _file(body) + b"yyz"
    assert unpack(_file(body) + b"yyz") == (header, [v1])
    with pytest.raises(ValueError, match="format version 1 cannot store a symbol digest"):
        pack(header, [layer], version=1)


def test_base_only_read_ignores_corrupt_enhancement(model, two_layers):
    data = bytearray(pack(HEADER, two_layers))
    data[-1] ^= 0xFF  # last byte belongs to the enhancement payload
    with pytest.raises(BitstreamError, match="CRC mismatch in layer 'enhancement'"):
        unpack(bytes(data))
    header, layers = unpack(bytes(data), layers={"base"})
    assert header == HEADER and layers == two_layers[:1]
    assert torch.equal(_decode(model, layers[0]), _decode(model, two_layers[0]))


def test_base_only_read_of_stream_cut_after_base(two_layers):
    data = pack(HEADER, two_layers)
    cut = len(data) - two_layers[1].payload_size
    assert unpack(data[:cut], layers=["base"])[1] == two_layers[:1]
    with pytest.raises(BitstreamError, match=f"expected {len(data)} bytes, only {cut} available"):
        unpack(data[:cut])
    with pytest.raises(BitstreamError, match="truncated"):
        unpack(data[: cut - 1], layers=["base"])


def test_reading_no_layers_returns_just_the_header(two_layers):
    assert unpack(pack(HEADER, two_layers), layers=()) == (HEADER, [])


# --- every corruption is a BitstreamError ----------------------------------------------


@pytest.mark.parametrize("wanted", [None, {"base"}])
def test_every_byte_flip_is_detected(two_layers, wanted):
    data = pack(HEADER, two_layers)
    enhancement_start = len(data) - two_layers[1].payload_size
    expected = unpack(data, layers=wanted)
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            try:
                got = unpack(bytes(bad), layers=wanted)
            except BitstreamError:
                continue
            # only bytes a base-only read never looks at may change silently
            assert wanted is not None and i >= enhancement_start, (i, mask)
            assert got == expected


def test_truncation_at_every_length_is_detected(two_layers):
    data = pack(HEADER, two_layers)
    for n in range(len(data)):
        with pytest.raises(BitstreamError, match="truncated|empty"):
            unpack(data[:n])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"not a taskcodec bitstream: it is empty \(0 bytes\)"),
        (b"\x89PNG\r\n\x1a\n", r"not a taskcodec bitstream \(magic b'\\x89PNG', expected b'TCDC'\)"),
        (b"TC", "truncated bitstream: magic needs 4 bytes, only 2 available"),
        (b"TCDC", "format version needs 1 bytes at offset 4, only 0 available"),
        (b"TCDC\x04" + bytes(20), r"unsupported taskcodec bitstream version 4 \(this reader supports versions 1, 2, 3"),
        (b"TCDC\x01\x32" + bytes(10), "truncated bitstream: header needs 50 bytes at offset 6, only 10 available"),
        (b"TCDC\x01" + b"\xff" * 11, "header length at offset 15 is a varint longer than 10 bytes"),
        (_file(_body([]))[:-1] + b"\x00", "header CRC mismatch"),
    ],
)
def test_malformed_files_name_the_problem(data, message):
    with pytest.raises(BitstreamError, match=message):
        unpack(data)


def test_absurd_lengths_do_not_allocate():
    entry = b"\x01m\x00\x01" + _varint(2**60) + bytes(4)
    with pytest.raises(BitstreamError, match=f"expected {2**60 + 40} bytes, only 40 available"):
        unpack(_file(_body([entry])))
    with pytest.raises(BitstreamError, match=f"payload of layer 'm' needs {2**60} bytes at offset 40"):
        unpack(_file(_body([entry])), layers={"m"})
    many_layers = _varint(len(b"c")) + b"c" + bytes(8) + b"\x01\x01" + _varint(2**60)
    with pytest.raises(BitstreamError, match=f"number of layers is {2**60} but only 0 bytes are left"):
        unpack(_file(many_layers))
    with pytest.raises(BitstreamError, match="corrupt header: height must be a positive int, got 0"):
        unpack(_file(_body([b"\x01m\x00\x00" + zlib.crc32(b"").to_bytes(4, "little")], height=0)))


def test_trailing_garbage_is_refused(two_layers):
    data = pack(HEADER, two_layers)
    for wanted in (None, {"base"}):
        with pytest.raises(BitstreamError, match=f"3 bytes of trailing garbage \\(expected {len(data)} bytes"):
            unpack(data + b"abc", layers=wanted)


def test_unknown_layer_names_the_available_ones(two_layers):
    expected = "layer 'extra' is not in this bitstream \\(it has: 'base', 'enhancement'\\)"
    with pytest.raises(BitstreamError, match=expected):
        unpack(pack(HEADER, two_layers), layers={"base", "extra"})


def test_check_checkpoint():
    bitstream.check_checkpoint(HEADER, "0123456789ABCDEF", "bmshj2018-factorized")
    with pytest.raises(BitstreamError, match=(
        "made with checkpoint 0123456789abcdef of codec 'bmshj2018-factorized', "
        "this is checkpoint ffffffffffffffff of codec 'bmshj2018-factorized'"
    )):
        bitstream.check_checkpoint(HEADER, "ffffffffffffffff", "bmshj2018-factorized")
    with pytest.raises(BitstreamError, match="of codec 'mbt2018'"):
        bitstream.check_checkpoint(HEADER, "0123456789abcdef", "mbt2018")


# --- bad arguments are ValueErrors -----------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Header("", "0123456789abcdef", 1, 1),
        lambda: Header("c", "0123456789abcde", 1, 1),
        lambda: Header("c", "0123456789abcdeg", 1, 1),
        lambda: Header("c", "0123456789abcdef", 0, 1),
        lambda: Header("c", "0123456789abcdef", 1, True),
        lambda: Layer("", (b"",), (1,)),
        lambda: Layer("main", b"bytes", (1,)),
        lambda: Layer("main", ("text",), (1,)),
        lambda: Layer("main", (b"",), (1.5,)),
        lambda: Layer("main", (b"",), (-1,)),
        lambda: Layer("main", (b"",), (1,), digest="abcd"),
        lambda: Layer("main", (b"",), (1,), digest=bytes(65)),
        lambda: pack(HEADER, []),
        lambda: pack(HEADER, [Layer("a", (b"",), ()), Layer("a", (b"",), ())]),
        lambda: unpack(pack(HEADER, [Layer("base", (b"",), ())]), layers="base"),
        lambda: unpack("TCDC"),
    ],
)
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


# --- files -----------------------------------------------------------------------------


def test_write_is_atomic_and_read_names_the_file(tmp_path, two_layers):
    path = tmp_path / "img.tcdc"
    n = bitstream.write(path, HEADER, two_layers)
    assert n == path.stat().st_size == len(pack(HEADER, two_layers))
    assert bitstream.read(str(path)) == (HEADER, two_layers)
    assert bitstream.read(path, layers={"enhancement"}) == (HEADER, two_layers[1:])

    before = path.read_bytes()
    with pytest.raises(ValueError):
        bitstream.write(path, HEADER, two_layers + two_layers)  # duplicate names
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["img.tcdc"]

    path.write_bytes(before + b"!")
    with pytest.raises(BitstreamError, match=f"^'{path}': corrupt bitstream: 1 bytes of trailing garbage"):
        bitstream.read(path)
    with pytest.raises(BitstreamError, match="cannot read bitstream .*missing.tcdc"):
        bitstream.read(tmp_path / "missing.tcdc")
    with pytest.raises(BitstreamError, match="cannot write bitstream .*no/such/dir"):
        bitstream.write(tmp_path / "no" / "such" / "dir", HEADER, two_layers)


# --- rate overhead and fingerprint -----------------------------------------------------


def test_header_size_is_small_and_exact():
    layer = Layer("main", (bytes(10_000), bytes(300)), (32, 48), digest=bytes(4))
    header = Header("bmshj2018-factorized", "0123456789abcdef", height=512, width=768)
    size = bitstream.header_size(header, [layer])
    assert size == len(pack(header, [layer])) - 10_300
    assert size < 64 + 5  # version 2 adds 5 bytes per layer (the symbol digest)


def test_checkpoint_fingerprint(model):
    state = model.state_dict()
    fp = bitstream.checkpoint_fingerprint(state)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert bitstream.checkpoint_fingerprint(dict(reversed(list(state.items())))) == fp

    changed = dict(state)
    changed["g_a.0.weight"] = state["g_a.0.weight"].clone()
    changed["g_a.0.weight"][0, 0, 0, 0] += 1e-3
    assert bitstream.checkpoint_fingerprint(changed) != fp
    as_double = dict(state, **{"g_a.0.bias": state["g_a.0.bias"].double()})
    assert bitstream.checkpoint_fingerprint(as_double) != fp
    renamed = {("x" + k if k == "g_a.0.bias" else k): v for k, v in state.items()}
    assert bitstream.checkpoint_fingerprint(renamed) != fp
    assert bitstream.checkpoint_fingerprint({"s": torch.tensor(3.0, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="'step' is a int"):
        bitstream.checkpoint_fingerprint(dict(state, step=3))
