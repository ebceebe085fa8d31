"""Keep ``import compressai`` from importing torch-geometric, which taskcodec never uses, and
the other heavy packages it imports before they are needed.

compressai 1.2.8's package ``__init__`` imports its point-cloud data sets, transforms and
registry entries, and those import torch-geometric (and through it ``torch._dynamo``): about
8 s of an 11.8 s ``import compressai`` on the development machine, paid by every CLI start.
Most of the rest beyond torch is scipy.stats (one function the hyperprior calls when its
entropy tables are built), pandas (the point-cloud ShapeNet data set) and requests (data-set
downloads): together about half as much again as ``import torch``.

The mechanism: while ``compressai`` itself is being imported, a meta-path finder answers
``import torch_geometric[.x]`` (and torchvision, see ``_PACKAGES``) with an empty stand-in
module whose every public name is an inert placeholder class (usable as a base class, a
decorator factory or a type hint: all that compressai's point-cloud modules do with them at
import time). As soon as that import finishes, the stand-ins are dropped from ``sys.modules``
and the finder removes itself, so a later real ``import torch_geometric`` or ``import
torchvision`` gets the real package. pandas and requests are answered the same way: only
compressai's point-cloud data sets and data-set downloads hold their stand-ins. scipy.stats,
which compressai does use, is imported lazily instead (``importlib.util.LazyLoader``): compressai
gets the real module, whose code runs at the first use of one of its names (by compressai or
anyone else) or at the next ``import scipy.stats``. Nothing installed is modified; only
compressai's point-cloud classes and download helpers in this process are inert (taskcodec
codes images only). ``TASKCODEC_FULL_COMPRESSAI=1`` turns the mechanism off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

# torch-geometric: point clouds only. torchvision: compressai's import reads only the names of
# ``torchvision.transforms`` into its transform registry, which taskcodec does not use; the
# real torchvision is imported later by whatever needs it (task heads, image-space networks).
# pandas: the point-cloud ShapeNet data set only. requests: compressai's data-set downloads.
_PACKAGES = ("torch_geometric", "torchvision", "pandas", "requests")
# Used by compressai, but not at its import: loaded at first use.
_LAZY = ("scipy.stats",)


def _covered(fullname: str, packages) -> bool:
    return any(fullname == p or fullname.startswith(p + ".") for p in packages)


class _Inert:
    """Stands for any torch-geometric class or function at compressai's import time."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, obj=None, *args, **kwargs):  # used as a decorator factory's result
        return obj


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that submodule imports reach the finder
    module.__taskcodec_stand_in__ = True

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        inert = type(attr, (_Inert,), {"__module__": name})
        setattr(module, attr, inert)
        return inert

    module.__getattr__ = __getattr__
    return module


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages):
        self.packages = packages

    def find_spec(self, fullname, path=None, target=None):
        if _covered(fullname, self.packages):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _stand_in(spec.name)

    def exec_module(self, module):
        pass


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Finds the real module and defers running its code until it is first used."""

    def __init__(self, names):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


class _LeanCompressaiFinder(importlib.abc.MetaPathFinder):
    """Finds the real ``compressai`` and runs its ``__init__`` with the stand-in finder armed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "compressai":
            return None
        sys.meta_path.remove(self)  # one-shot
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        packages = tuple(p for p in _PACKAGES if p not in sys.modules)  # never shadow a loaded one
        lazy = tuple(n for n in _LAZY if n not in sys.modules)
        if spec is None or spec.loader is None or not (packages or lazy):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            finders = [_StandInFinder(packages), _LazyFinder(lazy)]
            sys.meta_path[:0] = finders
            try:
                real_exec(module)
            finally:
                for finder in finders:
                    sys.meta_path.remove(finder)
                for key in [k for k in sys.modules if _covered(k, packages)]:
                    if getattr(sys.modules[key], "__taskcodec_stand_in__", False):
                        del sys.modules[key]

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Arm the one-shot finder (idempotent); a no-op once compressai is imported."""
    if os.environ.get("TASKCODEC_FULL_COMPRESSAI") == "1" or "compressai" in sys.modules:
        return
    if not any(isinstance(f, _LeanCompressaiFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LeanCompressaiFinder())
