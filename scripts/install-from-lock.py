"""Install taskcodec into a virtual environment from poetry.lock, using pip.

``poetry install`` needs the registry's versioned JSON API, which not every index serves;
pip only needs the simple API. This script turns the lock into pip *constraints* (every locked
package whose markers match this interpreter, pinned ``==`` to its locked version) and installs
the project (editable) plus the requested dependency groups under those constraints, so the
environment gets exactly the locked versions.

A package that the lock holds at two versions whose markers both match here (it happens with
CUDA runtime wheels pulled in by torch) is left to pip: the locked torch pins it exactly anyway.

``--deps-only`` installs the locked dependencies but not the project itself: a container build
runs it on pyproject.toml and poetry.lock alone, so that layer (torch included) is reused until
the dependencies change, and the code is installed in a later layer.

Usage: python scripts/install-from-lock.py VENV_PYTHON [--with dev] [--no-editable] [--deps-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _marker_env(python: str) -> dict:
    code = (
        "import json,sys;"
        "from pip._vendor.packaging.markers import default_environment;"
        "print(json.dumps(default_environment()))"
    )
    import json

    return json.loads(subprocess.check_output([python, "-c", code], text=True))


def constraints(lock: dict, env: dict) -> list[str]:
    from pip._vendor.packaging.markers import Marker

    versions: dict[str, list[str]] = defaultdict(list)
    for pkg in lock["package"]:
        marker = pkg.get("markers")
        if isinstance(marker, dict):  # per-group markers: any group that applies
            marker = " or ".join(f"({m})" for m in marker.values())
        if marker and not Marker(marker).evaluate(env):
            continue
        versions[pkg["name"]].append(pkg["version"])
    return sorted(f"{name}=={v[0]}" for name, v in versions.items() if len(v) == 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", help="the virtual environment's python")
    parser.add_argument("--with", dest="groups", action="append", default=[],
                        help="also install this poetry dependency group (repeatable)")
    parser.add_argument("--no-editable", action="store_true", help="install a regular copy")
    parser.add_argument("--deps-only", action="store_true",
                        help="install the locked dependencies only, not the project")
    args = parser.parse_args()

    lock = tomllib.loads((ROOT / "poetry.lock").read_text(encoding="utf-8"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    groups = project.get("tool", {}).get("poetry", {}).get("group", {})
    extra = []
    for group in args.groups:
        if group not in groups:
            print(f"install-from-lock: no dependency group {group!r} in pyproject.toml "
                  f"(have: {', '.join(sorted(groups)) or 'none'})", file=sys.stderr)
            return 2
        extra += sorted(groups[group]["dependencies"])

    pins = constraints(lock, _marker_env(args.python))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="taskcodec-constraints-",
                                     delete=False) as fh:
        fh.write("\n".join(pins) + "\n")
    if args.deps_only:
        targets = list(project["project"]["dependencies"])
    else:
        targets = [str(ROOT) if args.no_editable else f"-e{ROOT}"]
    target = " ".join(targets)
    cmd = [args.python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
           "-c", fh.name, *targets, *extra]
    print(f"install-from-lock: {len(pins)} locked pins; installing {target} {' '.join(extra)}",
          file=sys.stderr)
    try:
        return subprocess.call(cmd)
    finally:
        Path(fh.name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
