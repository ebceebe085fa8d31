"""Fuzzing ``unpack`` + decode with CRC-valid mutants of real files, for every checkpoint kind.

Every input must end in a decode or a :class:`BitstreamError`: no other exception, no signal,
no hang, no unbounded memory. Three ways to run it:

* ``python tests/fuzz_decode.py --mutants 2000 --seed 0`` - a fixed-seed run of structured
  mutants (header fields, shapes, string counts and lengths, payload bytes; CRCs recomputed),
  under a per-file time limit and an address-space limit. ``tests/test_untrusted.py`` runs it in a
  child process, so that a signal (a segfault in native code) is a failed test, not a dead suite.
* ``python tests/fuzz_decode.py --atheris -max_total_time=3600 CORPUS_DIR`` - coverage-guided
  fuzzing with atheris (a dev dependency), seeded with the real files and using the same
  CRC-fixing mutator; a crashing input is written by libFuzzer as ``crash-*``.
* ``python tests/fuzz_decode.py --native --mutants 2000`` - the same mutants through
  CompressAI's own (native) rANS decoder, to find the inputs it crashes on: the input being
  decoded is written to ``--current`` first, so it survives the crash.

Inputs that crashed or fooled a decoder are kept in ``tests/fuzz-regressions/`` (named
``KIND-*.tcd``, with a README); ``tests/test_untrusted.py`` decodes each of them.
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from taskcodec import bitstream
from taskcodec.bitstream import Header, Layer
from taskcodec.errors import BitstreamError

KINDS = ("codec-factorized", "codec-hyperprior", "base", "scalable", "codec-mbt2018",
         "codec-cheng2020")
#: The autoregressive kinds: their y decodes one latent position at a time, each position's
#: entropy parameters computed from the (possibly garbage) symbols decoded before it.
CONTEXT_KINDS = ("codec-mbt2018", "codec-cheng2020")
FUZZ_MAX_PIXELS = 256 * 256  # the decoder's limit under fuzzing: keeps each decode cheap
REGRESSIONS = Path(__file__).parent / "fuzz-regressions"


# --- the codecs and the real files they write ---------------------------------------------


def make_codecs() -> dict:
    """One tiny LoadedCodec per checkpoint kind, from seeded (untrained) weights."""
    from compressai.models import FactorizedPrior, MeanScaleHyperprior

    from taskcodec.codecs.autoregressive import Cheng2020Anchor, Mbt2018
    from taskcodec.codecs.loading import LoadedCodec
    from taskcodec.codecs.rebuild import build_base, build_scalable

    torch.manual_seed(0)
    base_args = {"N": 8, "M": 8, "task": "classification", "entropy_model": "factorized",
                 "num_classes": 4, "synthesis_head": False}
    scalable_args = {"base": {**base_args, "task": "segmentation", "entropy_model": "hyperprior"},
                     "N": 8, "M": 8, "method": "conditional", "target": "reconstruction",
                     "num_classes": 3, "condition_decoder": True}
    models = {
        "codec-factorized": ("bmshj2018-factorized", "codec", FactorizedPrior(N=8, M=8)),
        "codec-hyperprior": ("mbt2018-mean", "codec", MeanScaleHyperprior(N=8, M=8)),
        "base": ("base-classification", "base", build_base(base_args)),
        "scalable": ("scalable-conditional-reconstruction", "scalable",
                     build_scalable(scalable_args)),
        "codec-mbt2018": ("mbt2018", "codec", Mbt2018(N=8, M=8)),
        "codec-cheng2020": ("cheng2020-anchor", "codec", Cheng2020Anchor(N=8)),
    }
    codecs = {}
    for kind, (name, model_kind, model) in models.items():
        model.eval()
        model.update(force=True)
        fingerprint = bitstream.checkpoint_fingerprint(model.state_dict())
        codecs[kind] = LoadedCodec(name=name, kind=model_kind, model=model,
                                   fingerprint=fingerprint, config={}, model_args={},
                                   source=f"fuzz:{kind}")
    return codecs


def image(height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=g) * 2 - 0.5
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                           align_corners=False).clamp(0, 1)


def seed_files(codecs: dict) -> list[tuple[str, bytes]]:
    return [(kind, codec.compress(image(h, w, seed)))
            for kind, codec in codecs.items()
            for seed, (h, w) in enumerate([(64, 64), (40, 72)])]


def kind_of(path: Path) -> str:
    """The checkpoint kind of a regression file, from its name (``KIND-...tcd``)."""
    return next(kind for kind in KINDS if path.name.startswith(kind + "-"))


def decode_strict(codec, data: bytes) -> None:
    """Decode every layer, then (layered) the base alone; a BitstreamError propagates."""
    for layers in ([None, {"base"}] if codec.kind == "scalable" else [None]):
        codec.decompress(data, layers=layers, max_pixels=FUZZ_MAX_PIXELS)


def decode(codec, data: bytes) -> None:
    """What a reader of an untrusted file does: every layer, and (layered) the base alone."""
    for layers in ([None, {"base"}] if codec.kind == "scalable" else [None]):
        try:
            codec.decompress(data, layers=layers, max_pixels=FUZZ_MAX_PIXELS)
        except BitstreamError:
            pass


# --- CRC-valid mutations ------------------------------------------------------------------


def fix_header_crc(data: bytes) -> bytes:
    """Recompute the header CRC of (possibly mutated) bytes, where the header can be found."""
    import zlib

    r = bitstream._Reader(data, 5)
    try:
        body = r.varint("header length")
        end = r.pos + body
    except BitstreamError:
        return data
    if end + 4 > len(data):
        return data
    return data[:end] + zlib.crc32(data[:end]).to_bytes(4, "little") + data[end + 4:]


def restamp(data: bytes, fingerprint: str) -> bytes:
    """The file with its checkpoint id replaced (header CRC fixed), so that a regression file
    still reaches the decoder when the fuzz weights change (a new torch draws other weights)."""
    r = bitstream._Reader(data, 5)
    r.varint("header length")
    start = r.pos + 1 + r.data[r.pos]  # after the codec name (short: one length byte)
    return fix_header_crc(data[:start] + bytes.fromhex(fingerprint) + data[start + 8:])


def _mutate_bytes(s: bytes, rng: random.Random) -> bytes:
    s = bytearray(s)
    op = rng.randrange(6)
    if op == 0 and s:  # flip bits
        for _ in range(rng.randint(1, 4)):
            s[rng.randrange(len(s))] ^= 1 << rng.randrange(8)
    elif op == 1 and s:  # set bytes to an extreme
        for _ in range(rng.randint(1, 4)):
            s[rng.randrange(len(s))] = rng.choice([0, 0xFF, 0x7F, 0x80])
    elif op == 2:  # cut
        del s[rng.randrange(len(s) + 1):]
    elif op == 3:  # grow
        s += bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 4, 8, 64])))
    elif op == 4:  # replace with a pattern (0xFF words push the rANS decoder into bypass)
        s = bytearray(rng.choice([b"\xff", b"\x00", b"\x0f\xf0"]) * rng.randrange(1, 64))
    else:  # random bytes
        s = bytearray(rng.randbytes(rng.randrange(0, 48)))
    return bytes(s)


def _mutate_dim(d: int, rng: random.Random) -> int:
    return rng.choice([0, 1, d - 1, d + 1, 2 * d, d // 2, 2**20, 2**40, rng.randrange(64)])


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three mutations of a file; the CRCs of the result are valid where they can be."""
    for _ in range(10):
        try:
            return _mutate(data, rng)
        except ValueError:  # e.g. two layers renamed alike: pack refuses, draw again
            continue
    return data


def _mutate(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.1:  # raw bytes in the header body: varints, counts, names
        out = bytearray(data)
        end = min(len(out), 60)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(5, end)
            out[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, out[i] ^ (1 << rng.randrange(8))])
        return fix_header_crc(bytes(out))
    header, layers = bitstream.unpack(data)
    layers = list(layers)
    version = 2
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(layers))
        layer = layers[i]
        strings, shape, digest = list(layer.strings), list(layer.shape), layer.digest
        op = rng.randrange(12)
        if op <= 3 and strings:  # payload bytes (most mutants: they reach the entropy decoder)
            j = rng.randrange(len(strings))
            strings[j] = _mutate_bytes(strings[j], rng)
        elif op == 4 and len(strings) > 1:  # move bytes between strings (lengths change)
            joined = b"".join(strings)
            cut = rng.randrange(len(joined) + 1)
            strings = [joined[:cut], joined[cut:]] + strings[2:]
        elif op == 5:  # string count
            strings = rng.choice([strings[:-1], strings + strings[:1], strings[::-1], []])
        elif op == 6 and shape:  # latent shape
            k = rng.randrange(len(shape))
            shape[k] = _mutate_dim(shape[k], rng)
            if rng.random() < 0.2:
                shape = shape + [1] if rng.random() < 0.5 else shape[:-1]
        elif op == 7:  # image size, alone or with a matching latent shape
            h = _mutate_dim(header.height, rng) or 1
            w = _mutate_dim(header.width, rng) or 1
            header = Header(header.codec, header.checkpoint_id, h, w)
            if rng.random() < 0.5 and len(shape) == 2:
                stride = 64 if len(strings) == 2 else 16
                shape = [-(-h // 64) * 64 // stride, -(-w // 64) * 64 // stride]
        elif op == 8:  # the symbol digest
            digest = rng.choice([b"", bytes(4), rng.randbytes(4), rng.randbytes(12)])
        elif op == 9:  # layers: drop, reorder, rename
            choice = rng.randrange(3)
            if choice == 0 and len(layers) > 1:
                del layers[i]
                continue
            if choice == 1:
                layers.reverse()
                continue
            layers[i] = Layer(rng.choice(["main", "base", "enhancement", "x"]), strings,
                              tuple(shape), digest)
            continue
        elif op == 10:  # the previous format version (no digests)
            version = 1
        else:  # another codec name or checkpoint
            header = Header(rng.choice([header.codec, "mbt2018-mean", "base-depth"]),
                            rng.choice([header.checkpoint_id, "0" * 16]),
                            header.height, header.width)
        layers[i] = Layer(layers[i].name, tuple(strings), tuple(shape), digest)
    if version == 1:
        layers = [Layer(x.name, x.strings, x.shape) for x in layers]
    return bitstream.pack(header, layers, version=version)


# --- running ------------------------------------------------------------------------------


class Hang(BaseException):
    """A decode took longer than the per-file limit (BaseException: no handler swallows it)."""


def _alarm(signum, frame):
    raise Hang()


def limit_memory(max_bytes: int) -> None:
    """An address-space limit for this process: an unbounded allocation becomes MemoryError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        max_bytes = min(max_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, hard))


def run(mutants: int, seed: int, time_limit: float, current: Path | None = None,
        save_dir: Path | None = None, context_share: float = 0.05) -> int:
    """Decode ``mutants`` mutants, ``context_share`` of them of the autoregressive kinds (each
    decode some ten times slower); return 0, or 1 after printing the first failure."""
    codecs = make_codecs()
    seeds = seed_files(codecs)
    pools = ([s for s in seeds if s[0] not in CONTEXT_KINDS],
             [s for s in seeds if s[0] in CONTEXT_KINDS])
    for kind, data in seeds:  # honest files decode (and their digests match)
        decode_strict(codecs[kind], data)
    for path in sorted(REGRESSIONS.glob("*.tcd")):  # what crashed before, first
        codec = codecs[kind_of(path)]
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            decode(codec, restamp(path.read_bytes(), codec.fingerprint))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    rng = random.Random(seed)
    signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"decoded": 0, "refused": 0}
    start = time.perf_counter()
    for n in range(mutants):
        kind, data = rng.choice(pools[rng.random() < context_share])
        data = mutate(data, rng)
        if current is not None:
            current.write_bytes(bytes([KINDS.index(kind)]) + data)
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            try:
                codecs[kind].decompress(data, max_pixels=FUZZ_MAX_PIXELS)
                outcomes["decoded"] += 1
            except BitstreamError:
                outcomes["refused"] += 1
            if kind == "scalable":
                decode(codecs[kind], data)
        except (Exception, Hang) as err:
            what = f"over the {time_limit:g} s limit" if isinstance(err, Hang) else \
                "".join(traceback.format_exception_only(err)).strip()
            print(f"FAIL mutant {n} ({kind}, {len(data)} bytes): {what}", file=sys.stderr)
            traceback.print_exc()
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                path = save_dir / f"{kind}-seed{seed}-{n}.tcd"
                path.write_bytes(data)
                print(f"saved {path}", file=sys.stderr)
            return 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"{mutants} mutants in {time.perf_counter() - start:.1f} s: "
          f"{outcomes['decoded']} decoded, {outcomes['refused']} refused with a BitstreamError")
    return 0


def use_native_decoder(codecs: dict) -> None:
    """Put CompressAI's own rANS decoder back (to find the inputs that crash it)."""
    from compressai.entropy_models import EntropyModel
    from compressai.entropy_models.entropy_models import _EntropyCoder

    for codec in codecs.values():
        for module in codec.model.modules():
            if isinstance(module, EntropyModel):
                module.entropy_coder = _EntropyCoder("ans")


def run_atheris(argv: list[str]) -> None:
    import atheris

    from taskcodec.codecs import autoregressive, entropy, loading

    codecs = make_codecs()
    # Coverage of taskcodec's reading code only (instrumenting every import would take torch,
    # compressai and their dependencies too, and run far slower).
    for func in (bitstream.unpack, bitstream._parse_header, bitstream._Reader.varint,
                 bitstream._Reader.take, bitstream._Reader.count, bitstream._Reader.text,
                 entropy.RansStream.decode, entropy.RansStream.close,
                 autoregressive.SerialContextCoding._decompress_ar,
                 loading.LoadedCodec.read, loading.LoadedCodec.decompress,
                 loading.LoadedCodec.check_bounds, loading.LoadedCodec._check_digests):
        atheris.instrument_func(func)
    corpus = [d for d in argv[1:] if not d.startswith("-")]
    if corpus:  # seed an empty corpus folder with the real files
        folder = Path(corpus[0])
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.iterdir()):
            for i, (kind, data) in enumerate(seed_files(codecs)):
                (folder / f"seed-{i}").write_bytes(bytes([KINDS.index(kind)]) + data)

    def one_input(buf: bytes) -> None:
        if len(buf) < 2:
            return
        decode(codecs[KINDS[buf[0] % len(KINDS)]], buf[1:])

    def mutator(buf: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        kind, data = (buf[:1] or b"\0"), buf[1:]
        try:
            return kind + mutate(data, rng)
        except BitstreamError:  # not a valid file (any more): libFuzzer's bytes, CRC fixed
            return kind + fix_header_crc(atheris.Mutate(data, max(max_size - 1, 1)))

    atheris.Setup(argv, one_input, custom_mutator=mutator)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per file")
    parser.add_argument("--context-share", type=float, default=0.05,
                        help="share of the mutants of the autoregressive (slow) kinds")
    parser.add_argument("--max-memory", type=float, default=4.0, help="GiB of address space")
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="write a failing input here (KIND-seedS-N.tcd)")
    parser.add_argument("--native", action="store_true",
                        help="decode with CompressAI's native decoder (expect crashes)")
    parser.add_argument("--current", type=Path, default=None,
                        help="write each input here before decoding it (kind byte + file)")
    parser.add_argument("--atheris", action="store_true",
                        help="coverage-guided fuzzing; other arguments go to libFuzzer")
    args, rest = parser.parse_known_args()
    limit_memory(int(args.max_memory * 2**30))
    if args.atheris:
        run_atheris([sys.argv[0], *rest])
        return 0
    if args.native:
        global make_codecs
        safe = make_codecs

        def make_codecs() -> dict:
            codecs = safe()
            use_native_decoder(codecs)
            return codecs
    return run(args.mutants, args.seed, args.time_limit, args.current, args.save_dir,
               args.context_share)


if __name__ == "__main__":
    sys.exit(main())
