"""Untrusted bitstreams: the memory-safe rANS decoder, bounds before allocation, desynchronised
decodes refused by the symbol digest, and a fuzzing run in a child process (signals are failures).

The codecs are the fuzz harness's tiny seeded models (tests/fuzz_decode.py), one per checkpoint
kind, built once for the module.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressai import ans

import fuzz_decode
from taskcodec import bitstream
from taskcodec.codecs.entropy import rans_decode
from taskcodec.errors import BitstreamError, DesyncError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def codecs() -> dict:
    return fuzz_decode.make_codecs()


@pytest.fixture(scope="module")
def files(codecs) -> dict:
    return {kind: codec.compress(fuzz_decode.image(64, 64, 0)) for kind, codec in codecs.items()}


# --- the safe decoder is CompressAI's decoder, bounded --------------------------------------

CDFS = [[0, 100, 30000, 65536, 0, 0], [0, 1, 2, 65000, 65535, 65536]]
SIZES, OFFSETS = [4, 6], [-1, -3]


def test_safe_decoder_returns_what_the_native_encoder_coded_including_bypass_outliers():
    rng = random.Random(0)
    for _ in range(100):
        n = rng.randint(10, 200)
        indexes = [rng.randrange(2) for _ in range(n)]
        # values far outside the tables go through the bypass path (4-bit groups)
        symbols = [rng.choice([0, 1, -1, 2, 5, -50, 10**6, -(10**8), 2**26]) for _ in range(n)]
        string = ans.RansEncoder().encode_with_indexes(symbols, indexes, CDFS, SIZES, OFFSETS)
        assert rans_decode(string, indexes, CDFS, SIZES, OFFSETS) == symbols
        assert ans.RansDecoder().decode_with_indexes(string, indexes, CDFS, SIZES, OFFSETS) == symbols


@pytest.mark.parametrize(("string", "message"), [
    (b"", "0 bytes is not a whole number"),
    (b"\xff" * 7, "7 bytes"),
    (b"\x00" * 8, "ends before its last symbol"),           # state 0: needs a word per symbol
    (b"\xff" * 64, "bypass groups"),                          # all ones: endless bypass counts
    (b"\x00\x00\x00\x80" + bytes(4) + b"\x01" * 400, "did not end where the encoder began"),
])
def test_strings_that_would_send_the_native_decoder_past_their_end_are_refused(string, message):
    # CompressAI's decoder reads these past the buffer (issue #300); here: one error line
    with pytest.raises(DesyncError, match=message):
        rans_decode(string, [1] * 50, CDFS, SIZES, OFFSETS)


def _version_1(data: bytes) -> bytes:
    header, layers = bitstream.unpack(data)
    return bitstream.pack(header, [bitstream.Layer(x.name, x.strings, x.shape) for x in layers],
                          version=1)


def test_honest_files_decode_bit_exactly_like_the_native_decoder(codecs, files):
    native = fuzz_decode.make_codecs()
    fuzz_decode.use_native_decoder(native)  # records no digest: give it the digest-free version
    for kind, data in files.items():
        safe_out = codecs[kind].decompress(data)
        native_out = native[kind].decompress(_version_1(data))
        for key in ("x_hat", "logits"):
            if key in safe_out:
                assert torch.equal(safe_out[key], native_out[key]), (kind, key)
        if "task" in safe_out:
            assert torch.equal(safe_out["task"], native_out["task"]), kind


# --- desynchronised decodes -----------------------------------------------------------------


def test_entropy_parameters_a_few_ulps_off_are_refused_with_the_integrity_error(codecs, files):
    codec = codecs["codec-hyperprior"]
    gc = codec.model.gaussian_conditional
    honest = codec.decompress(files["codec-hyperprior"])["x_hat"]
    build_indexes = gc.build_indexes
    changed = []

    def perturbed(scales):  # the hyper-decoder's scales, 4 ULPs up (another CPU's rounding)
        s = gc.lower_bound_scale(scales)
        for _ in range(4):
            s = torch.nextafter(s, torch.full_like(s, math.inf))
        indexes = build_indexes(s)
        changed.append(int((indexes != build_indexes(scales)).sum()))
        return indexes

    gc.build_indexes = perturbed
    try:
        with pytest.raises(DesyncError, match="decode on the same kind of device as the encoder"):
            codec.decompress(files["codec-hyperprior"])
    finally:
        del gc.build_indexes
    assert changed and changed[0] > 0  # the perturbation did move some symbols to other CDFs
    assert torch.equal(codec.decompress(files["codec-hyperprior"])["x_hat"], honest)


def test_a_symbol_digest_that_does_not_match_is_refused(codecs, files):
    header, layers = bitstream.unpack(files["scalable"])
    assert all(len(layer.digest) == 4 for layer in layers)
    wrong = [bitstream.Layer(x.name, x.strings, x.shape,
                             bytes(4) if x.name == "enhancement" else x.digest) for x in layers]
    data = bitstream.pack(header, wrong)
    with pytest.raises(DesyncError, match=r"layer 'enhancement' decoded to other symbols .*"
                                          r"the file says 00000000"):
        codecs["scalable"].decompress(data)
    codecs["scalable"].decompress(data, layers={"base"})  # the base's digest still matches


def test_version_1_files_without_digests_still_decode(codecs, files):
    for kind, data in files.items():
        old = _version_1(data)
        assert old[4] == 1 and len(old) == len(data) - 5 * len(bitstream.unpack(data)[1])
        new_out, old_out = codecs[kind].decompress(data), codecs[kind].decompress(old)
        assert new_out.keys() == old_out.keys()


@pytest.mark.timeout(120, method="thread")  # a hang fails the test instead of stalling the suite
@pytest.mark.parametrize("kind", fuzz_decode.CONTEXT_KINDS)
def test_a_context_models_truncated_or_corrupted_strings_decode_or_are_one_error_line(
        codecs, files, kind):
    # The position loop decodes y in steps, each step's tables chosen by the symbols before it:
    # garbage symbols must steer it to a refusal (or some image), never past the string's end.
    codec = codecs[kind]
    header, (layer,) = bitstream.unpack(files[kind])
    y, z = layer.strings
    rng = random.Random(0)
    strings = [(y[:n], z) for n in (0, 4, 8, len(y) // 2, len(y) - 4)]
    strings += [(y, z[:-4]), (y, b""), (bytes(len(y)), z), (b"\xff" * len(y), z), (y[::-1], z),
                (y + y, z), (y, y)]
    strings += [(fuzz_decode._mutate_bytes(y, rng), z) for _ in range(8)]
    refused = 0
    for bad in strings:
        data = bitstream.pack(header, [bitstream.Layer(layer.name, bad, layer.shape,
                                                       layer.digest)])
        try:
            x_hat = codec.decompress(data)["x_hat"]
        except BitstreamError as err:
            assert len(str(err).splitlines()) == 1, str(err)
            refused += 1
        else:
            assert x_hat.shape == (1, 3, 64, 64) and bool(torch.isfinite(x_hat).all())
    assert refused >= len(strings) - 4  # almost every damaged string is caught


# --- bounds before allocation ---------------------------------------------------------------


def _with(data: bytes, height: int | None = None, width: int | None = None,
          shape: tuple | None = None) -> bytes:
    header, layers = bitstream.unpack(data)
    header = bitstream.Header(header.codec, header.checkpoint_id, height or header.height,
                              width or header.width)
    layers = [bitstream.Layer(x.name, x.strings, shape or x.shape, x.digest) for x in layers]
    return bitstream.pack(header, layers)


def test_latent_shapes_must_match_the_header_image_size(codecs, files):
    hyper = files["codec-hyperprior"]
    assert bitstream.unpack(hyper)[1][0].shape == (1, 1)  # z of a 64x64 image: 1/64
    with pytest.raises(BitstreamError, match=r"layer 'main' has 2 strings of latent shape "
                                             r"\(1, 1\); for a 65x64 image mbt2018-mean writes "
                                             r"2 of shape \(1, 2\)"):
        codecs["codec-hyperprior"].decompress(_with(hyper, width=65))
    with pytest.raises(BitstreamError, match=r"of latent shape \(1048576, 1048576\)"):
        codecs["codec-hyperprior"].decompress(_with(hyper, shape=(2**20, 2**20)))
    factorized = files["codec-factorized"]
    assert bitstream.unpack(factorized)[1][0].shape == (4, 4)  # y: 1/16
    with pytest.raises(BitstreamError, match=r"writes 1 of shape \(8, 4\)"):
        codecs["codec-factorized"].decompress(_with(factorized, height=128))


def test_a_header_asking_for_a_huge_image_is_refused_before_decoding(codecs, files):
    codec = codecs["codec-factorized"]
    huge = _with(files["codec-factorized"], height=100_000, width=100_000, shape=(6250, 6250))
    with pytest.raises(BitstreamError, match=r"image size 100000x100000 \(10000000000 pixels\) "
                                             r"is over this decoder's limit of 16777216 pixels"):
        codec.decompress(huge)
    with pytest.raises(BitstreamError, match="limit of 4095 pixels"):
        codec.decompress(files["codec-factorized"], max_pixels=4095)
    assert codec.decompress(files["codec-factorized"], max_pixels=4096)["x_hat"].shape[-1] == 64


# --- fuzzing --------------------------------------------------------------------------------


def test_crashing_inputs_found_while_fuzzing_now_end_in_a_bitstream_error(codecs):
    found = sorted((HERE / "fuzz-regressions").glob("*.tcd"))
    assert found, "the regression files are missing"
    for path in found:
        codec = codecs[fuzz_decode.kind_of(path)]
        data = fuzz_decode.restamp(path.read_bytes(), codec.fingerprint)
        with pytest.raises(BitstreamError):
            fuzz_decode.decode_strict(codec, data)


def test_2000_crc_valid_mutants_end_in_a_decode_or_a_bitstream_error_in_a_child_process():
    # A child process: a segfault in native code fails this test instead of killing the suite.
    # The child limits its address space and each file's decoding time itself.
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_decode.py"), "--mutants", "2000",
                           "--seed", "0", "--time-limit", "20", "--max-memory", "6"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode >= 0, f"the decoder died of signal {-proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2000 mutants" in proc.stdout
