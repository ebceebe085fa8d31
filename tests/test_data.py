"""Data sets: embedded photographs, image folders and archives, crops, errors, padding."""

from __future__ import annotations

import io
import os
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taskcodec.data import (
    TRAIN_IMAGES,
    VAL_IMAGES,
    EmbeddedImages,
    ImageFolder,
    build_dataset,
    crop_padding,
    describe,
    pad_to_multiple,
)
from taskcodec.errors import DataError


def write_image(path: Path, size=(80, 72), mode="RGB", seed=0) -> Path:
    """A random image of ``size`` (w, h) saved with Pillow; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch) -> Path:
    """Archives unpack into the test's own folder, never into ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TASKCODEC_DATA_CACHE", str(cache))
    return cache


def flat_folder(root: Path, n: int) -> Path:
    for i in range(n):
        write_image(root / f"img{i:02d}.png", seed=i)
    return root


# -- embedded ----------------------------------------------------------------------------------

def test_embedded_split_is_fixed_and_disjoint():
    train = EmbeddedImages("train", max_side=128, patch_size=64)
    val = EmbeddedImages("val", max_side=128)
    assert train.names == list(TRAIN_IMAGES) and val.names == list(VAL_IMAGES)
    assert set(train.names).isdisjoint(val.names)
    assert len(val.names) == 2 and len(train.names) + len(val.names) == 8
    assert EmbeddedImages("train", max_side=128).names == train.names


def test_embedded_items_are_float_rgb_in_unit_range():
    val = EmbeddedImages("val", max_side=128)
    train = EmbeddedImages("train", max_side=128, patch_size=(48, 80))
    assert len(val) == 2
    for x in [val[0], val[1], train[0], train[5]]:
        assert x.dtype == torch.float32 and x.dim() == 3 and x.shape[0] == 3
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert float(x.max()) > 0.5  # real pixels, not a blank image
    assert train[3].shape == (3, 48, 80)


def test_embedded_max_side_is_respected():
    small = EmbeddedImages("train", max_side=100, crop=False)
    sides = [tuple(small[i].shape[1:]) for i in range(len(small))]
    assert all(max(h, w) == 100 for h, w in sides)  # every original is larger than 100
    default = build_dataset("embedded", "val")
    assert all(max(default[i].shape[1:]) <= 512 for i in range(len(default)))
    coffee = default[default.names.index("coffee")]
    assert tuple(coffee.shape[1:]) == (341, 512)  # 600x400 scaled, aspect kept


def test_crops_are_reproducible_per_seed_and_epoch():
    a = EmbeddedImages("train", max_side=128, patch_size=32, seed=1)
    b = EmbeddedImages("train", max_side=128, patch_size=32, seed=1)
    c = EmbeddedImages("train", max_side=128, patch_size=32, seed=2)
    assert all(torch.equal(a[i], b[i]) for i in range(8))
    assert not all(torch.equal(a[i], c[i]) for i in range(8))
    first = [a[i] for i in range(8)]
    a.set_epoch(1)
    assert not all(torch.equal(a[i], x) for i, x in enumerate(first))
    a.set_epoch(0)
    assert all(torch.equal(a[i], x) for i, x in enumerate(first))


def test_epoch_length_and_flips():
    assert len(EmbeddedImages("train", max_side=128)) == 64  # 6 images, at least 64 crops
    assert len(EmbeddedImages("train", max_side=128, epoch_length=10)) == 10
    flipped = EmbeddedImages("train", max_side=128, patch_size=32, hflip=True)
    plain = EmbeddedImages("train", max_side=128, patch_size=32)
    same = [torch.equal(flipped[i], plain[i]) for i in range(16)]
    assert any(same) and not all(same)  # same corner, about half of them mirrored
    with pytest.raises(IndexError):
        plain[64]


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match='"test"'):
        build_dataset("embedded", "test")
    with pytest.raises(ValueError, match="patch_size"):
        EmbeddedImages("train", patch_size=0)
    with pytest.raises(ValueError, match="seed"):
        EmbeddedImages("train", seed=-1)


def test_describe_is_one_line():
    line = describe(EmbeddedImages("train", max_side=128, patch_size=64))
    assert line == "embedded [train]: 6 images, 64 random 64x64 crops per epoch (seed 0)"
    assert describe(build_dataset("embedded", "val")) == "embedded [val]: 2 images, whole images"


# -- folders -----------------------------------------------------------------------------------

def test_folder_with_train_and_val_subfolders(tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        write_image(root / "train" / f"t{i}.png", seed=i)
    write_image(root / "train" / "deeper" / "t9.jpg", seed=9)
    write_image(root / "val" / "v0.png", size=(70, 50), seed=10)
    (root / "train" / "notes.txt").write_text("not an image")
    train = ImageFolder(root, "train", patch_size=64)
    val = build_dataset(str(root), "val")
    assert [Path(n).relative_to(root).as_posix() for n in train.names] == [
        "train/deeper/t9.jpg", "train/t0.png", "train/t1.png", "train/t2.png"]
    assert len(train) == 64 and train[0].shape == (3, 64, 64)
    assert len(val) == 1 and val[0].shape == (3, 50, 70)  # whole, unpadded
    assert val.layout == "val/ folder"


def test_test_folder_counts_as_val(tmp_path):
    write_image(tmp_path / "train" / "a.png")
    write_image(tmp_path / "test" / "b.png", seed=1)
    assert [Path(n).name for n in ImageFolder(tmp_path, "val").names] == ["b.png"]


def test_a_missing_split_folder_is_an_error_naming_what_is_there(tmp_path):
    write_image(tmp_path / "train" / "a.png")
    with pytest.raises(DataError, match=r"has no val/ folder \(it has train/\)"):
        ImageFolder(tmp_path, "val")


def test_a_folder_with_only_test_serves_evaluation(tmp_path):
    for i in range(3):
        write_image(tmp_path / "test" / f"t{i}.png", seed=i)
    for split in ("test", "val", "auto", "all"):
        folder = ImageFolder(tmp_path, split)
        assert len(folder.names) == 3 and folder.layout == "test/ folder", split
    with pytest.raises(DataError, match="no train/ folder"):
        ImageFolder(tmp_path, "train")


def test_all_and_test_of_a_flat_folder_are_every_image(tmp_path):
    flat_folder(tmp_path, 12)
    for split in ("all", "test", "auto"):
        folder = build_dataset(str(tmp_path), split)
        assert len(folder) == 12 and folder.split in ("all", "test"), split
    write_image(tmp_path / "sub" / "train" / "a.png")
    write_image(tmp_path / "sub" / "val" / "b.png", seed=1)
    both = ImageFolder(tmp_path / "sub", "all")
    assert [Path(n).name for n in both.names] == ["a.png", "b.png"]
    assert ImageFolder(tmp_path / "sub", "auto").split == "val"


def test_folder_without_subfolders_sends_every_tenth_file_to_val(tmp_path):
    flat_folder(tmp_path, 12)
    train = ImageFolder(tmp_path, "train", patch_size=64)
    val = ImageFolder(tmp_path, "val")
    assert [Path(n).name for n in val.names] == ["img00.png", "img10.png"]
    assert len(train.names) == 10 and set(train.names).isdisjoint(val.names)


def test_two_images_give_one_per_split_and_one_image_serves_both(tmp_path):
    flat_folder(tmp_path / "two", 2)
    assert len(ImageFolder(tmp_path / "two", "train").names) == 1
    assert len(ImageFolder(tmp_path / "two", "val").names) == 1
    flat_folder(tmp_path / "one", 1)
    with pytest.warns(UserWarning, match="both train and val"):
        only = ImageFolder(tmp_path / "one", "train", patch_size=64)
    assert len(only.names) == 1


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("L", (64, 64), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (64, 64), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(tmp_path / "gray16.png")
    ds = ImageFolder(tmp_path, "train", crop=False)
    got = {Path(n).name: ds[i] for i, n in enumerate(ds.names)}
    expected = {"gray.png": (128, 128, 128), "rgba.png": (10, 20, 30),
                "palette.png": (200, 100, 50), "gray16.png": (255, 255, 255)}
    assert set(got) == set(expected) - {"gray.png"}  # gray.png is the val image (index 0)
    for name, x in got.items():
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert torch.allclose(x[:, 0, 0], torch.tensor(expected[name]) / 255.0), name
    gray = ImageFolder(tmp_path, "val")[0]
    assert torch.allclose(gray[:, 5, 5], torch.full((3,), 128 / 255.0))


# -- errors ------------------------------------------------------------------------------------

def test_missing_and_empty_sources_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist: .*nowhere"):
        build_dataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images \(\.png, \.jpg.*\) found in .*empty"):
        ImageFolder(tmp_path / "empty", "train")


def test_corrupt_file_fails_on_first_use_naming_it(tmp_path):
    flat_folder(tmp_path, 3)
    (tmp_path / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    ds = ImageFolder(tmp_path, "train", patch_size=64, epoch_length=2)  # img01, img02
    with pytest.raises(DataError, match=r"cannot read image .*img01\.png: "):
        ds[0]
    assert ds[1].shape == (3, 64, 64)
    problems = ds.verify()
    assert len(problems) == 1 and "img01.png" in problems[0] and "\n" not in problems[0]


def test_image_smaller_than_the_crop_is_named(tmp_path):
    write_image(tmp_path / "train" / "tiny.png", size=(40, 30))
    write_image(tmp_path / "val" / "v.png")
    ds = ImageFolder(tmp_path, "train", patch_size=64)
    with pytest.raises(DataError, match=r"image .*tiny\.png is 40x30, smaller than the 64x64 "
                                        r"training crop"):
        ds[0]


def test_skip_bad_warns_and_skips(tmp_path):
    write_image(tmp_path / "train" / "a_tiny.png", size=(40, 30))
    (tmp_path / "train" / "b_broken.jpg").write_bytes(b"garbage")
    write_image(tmp_path / "train" / "c_good.png", seed=3)
    (tmp_path / "val" / "bad.png").parent.mkdir()
    (tmp_path / "val" / "bad.png").write_bytes(b"garbage")
    write_image(tmp_path / "val" / "good.png", size=(70, 50))
    train = build_dataset(str(tmp_path), "train", patch_size=64, skip_bad=True)
    with pytest.warns(UserWarning) as caught:
        crops = [train[i] for i in range(6)]
    messages = " | ".join(str(w.message) for w in caught)
    assert "a_tiny.png" in messages and "b_broken.jpg" in messages
    with pytest.warns(UserWarning, match="b_broken.jpg"):  # whole images: no size limit
        whole = ImageFolder(tmp_path, "train", crop=False, skip_bad=True)
    assert [Path(n).name for n in whole.names] == ["a_tiny.png", "c_good.png"]
    good = whole[1]
    for x in crops:  # every crop is a window of the one usable image
        assert any(torch.equal(x, good[:, t:t + 64, l:l + 64])
                   for t in range(good.shape[1] - 63) for l in range(good.shape[2] - 63))
    with pytest.warns(UserWarning, match="bad.png"):
        val = build_dataset(str(tmp_path), "val", skip_bad=True)
    assert [Path(n).name for n in val.names] == ["good.png"] and len(val) == 1


def test_skip_bad_with_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "bad.png").write_bytes(b"garbage")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "bad.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no usable images"):
            ImageFolder(tmp_path, "val", skip_bad=True)
        with pytest.raises(DataError, match="no usable images"):
            ImageFolder(tmp_path, "train", skip_bad=True)[0]


# -- archives ----------------------------------------------------------------------------------

def image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (72, 80, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode="w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["zip", "tar", "tgz"])
def test_archive_is_extracted_once(tmp_path, data_cache, kind):
    members = {f"photos/img{i}.png": image_bytes(i) for i in range(3)}
    if kind == "zip":
        archive = make_zip(tmp_path / "photos.zip", members)
    else:
        archive = make_tar(tmp_path / f"photos.{kind}", members, "w" if kind == "tar" else "w:gz")
    first = build_dataset(str(archive), "train", patch_size=64)
    assert [p.name for p in data_cache.iterdir()] == [first.root.parent.name]
    assert first.root.name == "photos"  # the single top-level folder is stepped into
    assert len(first.names) == 2 and first[0].shape == (3, 64, 64)
    assert describe(first).startswith(f"{archive} [train]: 2 images")
    marker = first.root.parent / ".marker"  # hidden: not a second top-level folder
    marker.write_text("still here")
    stamp = first.root.parent.stat().st_mtime_ns
    second = ImageFolder(archive, "val")
    assert second.root == first.root and marker.exists()
    assert first.root.parent.stat().st_mtime_ns == stamp
    assert len(list(data_cache.iterdir())) == 1  # no second copy, no partial folder
    os.utime(archive, ns=(1, 1))  # a changed archive is unpacked afresh
    assert ImageFolder(archive, "val").root != first.root


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "ok/../../evil.png"])
def test_archive_traversal_members_are_refused(tmp_path, data_cache, name):
    for archive in (make_zip(tmp_path / "bad.zip", {name: image_bytes(0)}),
                    make_tar(tmp_path / "bad.tar.gz", {name: image_bytes(0)})):
        with pytest.raises(DataError, match=f"unsafe member '{name}'"):
            ImageFolder(archive, "train")
    assert not (tmp_path / "evil.png").exists()
    assert not data_cache.exists() or list(data_cache.iterdir()) == []  # no half folder left


def test_archive_links_are_refused(tmp_path, data_cache):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        data = image_bytes(0)
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(DataError, match="link or special member 'b.png'"):
        ImageFolder(archive, "train")
    zipped = tmp_path / "links.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        info = zipfile.ZipInfo("c.png")
        info.external_attr = (0o120777 << 16)  # a symlink, as `zip -y` stores it
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="link or special member 'c.png'"):
        ImageFolder(zipped, "train")


def test_corrupt_archive_is_a_data_error(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK not really a zip")
    with pytest.raises(DataError, match=r"cannot extract archive .*broken\.zip"):
        ImageFolder(archive, "train")


# -- padding -----------------------------------------------------------------------------------

def test_pad_to_multiple_round_trip():
    x = torch.rand(2, 3, 100, 65)
    padded, pads = pad_to_multiple(x, 64)
    assert padded.shape == (2, 3, 128, 128)
    assert pads == (14, 14, 31, 32)  # centred like CompressAI's compute_padding
    assert torch.equal(padded[..., 14:114, 31:96], x)
    assert float(padded[..., :14, :].abs().sum()) == 0.0  # zeros, as CompressAI's eval pads
    assert float(padded[..., :, 96:].abs().sum()) == 0.0
    assert torch.equal(crop_padding(padded, pads), x)
    same, none = pad_to_multiple(torch.rand(1, 3, 64, 128))
    assert none == (0, 0, 0, 0) and same.shape == (1, 3, 64, 128)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(x, 0)


def test_cached_folder_cuts_later_crops_without_decoding_again(tmp_path):
    folder = flat_folder(tmp_path / "imgs", 3)
    cached = ImageFolder(folder, "train", patch_size=32, cache_mb=1, epoch_length=6)
    uncached = ImageFolder(folder, "train", patch_size=32, epoch_length=6)
    first = [cached[i] for i in range(6)]
    assert all(torch.equal(a, uncached[i]) for i, a in enumerate(first))
    for path in folder.rglob("*.png"):
        path.write_bytes(b"gone")  # every file is unreadable from now on
    cached.set_epoch(1)
    assert [c.shape for c in (cached[i] for i in range(6))] == [(3, 32, 32)] * 6
    with pytest.raises(DataError, match="cannot read image"):
        uncached[0]
