"""Unpack an image archive once, safely, into a cache folder that survives the process.

A cluster job is often handed one ``.tar`` or ``.zip`` of images (copied to the node's
``$SLURM_TMPDIR``) rather than thousands of small files on a shared filesystem. The archive is
unpacked once; later runs find the folder by the archive's path, size and modification time.

Unpacking goes to a private temporary folder that is renamed into place only when complete,
so an interrupted extraction is never mistaken for a finished one. Every member is checked
before anything is written: absolute paths, ``..`` components, links and device files are
refused with a :class:`DataError` naming the member.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from taskcodec.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PARTIAL_PREFIX = ".partial-"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def cache_root() -> Path:
    """``$TASKCODEC_DATA_CACHE``, else ``$SLURM_TMPDIR/taskcodec-data`` (the job's fast local
    disk), else ``~/.cache/taskcodec/datasets``."""
    if os.environ.get("TASKCODEC_DATA_CACHE"):
        return Path(os.environ["TASKCODEC_DATA_CACHE"]).expanduser()
    if os.environ.get("SLURM_TMPDIR"):
        return Path(os.environ["SLURM_TMPDIR"]) / "taskcodec-data"
    return Path.home() / ".cache" / "taskcodec" / "datasets"


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def cache_dir_for(archive: Path) -> Path:
    """The folder ``archive`` unpacks to: changes when the archive is moved, resized or
    touched, so a replaced archive is never served from a stale folder."""
    st = archive.stat()
    key = f"{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / f"{_stem(archive.name)}-{digest}"


def _check_name(archive: Path, name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(f"archive {archive} has an unsafe member {name!r} "
                        "(absolute path or '..'); refusing to extract it")


def _unpack_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            _check_name(archive, info.filename)
            # Unix type bits, when the zip has them (zips made elsewhere carry none).
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise DataError(f"archive {archive} has a link or special member "
                                f"{info.filename!r}; refusing to extract it")
        zf.extractall(dest, members)


def _unpack_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for member in members:
            _check_name(archive, member.name)
            if not (member.isfile() or member.isdir()):
                raise DataError(f"archive {archive} has a link or special member "
                                f"{member.name!r}; refusing to extract it")
        # The "data" filter (Python >= 3.11.4) repeats the checks above inside tarfile and
        # drops set-uid bits; older Pythons rely on the checks above alone.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(dest, members, **safe)


def extract(archive: Path) -> Path:
    """Unpack ``archive`` into its cache folder unless already done; return the folder."""
    final = cache_dir_for(archive)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{final.name}-", dir=final.parent))
    try:
        if archive.name.lower().endswith(".zip"):
            _unpack_zip(archive, tmp)
        else:
            _unpack_tar(archive, tmp)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot extract archive {archive}: {reason}") from None
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process (another rank of the same job) finished first: use its copy.
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final
