"""Refresh poetry.lock on machines whose package index only serves the "simple" API.

Poetry's built-in PyPI source asks the versioned JSON API, which some mirrors and proxies
(ours included) answer with 404. This script locks a temporary copy of pyproject.toml to
which it adds pip's own default index as a *legacy* (simple API) source, then turns the result
back into an ordinary lock for the committed pyproject:

* the ``[package.source]`` blocks naming that index are dropped (no index host is committed),
* ``content-hash`` is recomputed for the committed pyproject.toml,

so ``poetry check --lock`` accepts it and the lock is a plain PyPI lock anywhere else.

Run it with the Python of an environment that has poetry installed (``make update`` does).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_simple_index() -> str:
    from pip._internal.models.index import PyPI  # the index pip itself uses by default

    return PyPI.simple_url


def main() -> int:
    poetry = Path(sys.executable).with_name("poetry")
    with tempfile.TemporaryDirectory(prefix="taskcodec-lock-") as tmp:
        work = Path(tmp)
        for name in ("pyproject.toml", "README.md", "poetry.lock"):
            if (ROOT / name).exists():
                shutil.copy(ROOT / name, work / name)
        (work / "src" / "taskcodec").mkdir(parents=True)
        (work / "src" / "taskcodec" / "__init__.py").touch()
        with open(work / "pyproject.toml", "a", encoding="utf-8") as fh:
            fh.write(
                "\n[[tool.poetry.source]]\n"
                'name = "index"\n'
                f'url = "{default_simple_index()}"\n'
                'priority = "primary"\n'
            )
        subprocess.run([str(poetry), "lock", "--no-interaction"], cwd=work, check=True)
        text = (work / "poetry.lock").read_text(encoding="utf-8")

    # Drop every [package.source] table (it runs to the next blank line).
    text = re.sub(r"\n\[package\.source\]\n(?:[^\n]+\n)*", "\n", text)
    from poetry.factory import Factory

    content_hash = Factory().create_poetry(ROOT).locker._get_content_hash()
    text, n = re.subn(r'content-hash = "[0-9a-f]+"', f'content-hash = "{content_hash}"', text)
    if n != 1:
        print("update-lock: no content-hash found in the generated lock", file=sys.stderr)
        return 1
    (ROOT / "poetry.lock").write_text(text, encoding="utf-8")
    subprocess.run([str(poetry), "check", "--lock"], cwd=ROOT, check=True)
    print("poetry.lock updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
