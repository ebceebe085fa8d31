"""compressai is imported without torch-geometric, torchvision, pandas and requests, with
scipy.stats loaded only when used, and all of them stay importable.

Runs in a fresh interpreter: the mechanism acts on the first ``import compressai`` of a process,
which in the test process happened long ago.
"""

from __future__ import annotations

import os
import subprocess
import sys

_CHECK = r"""
import sys
import taskcodec  # arms the finder
import compressai
from compressai.models import FactorizedPrior

loaded = sorted(k for k in sys.modules
                if k.split(".")[0] in ("torch_geometric", "torchvision", "pandas", "requests"))
print("after compressai:", loaded)
assert not loaded, loaded
assert type(sys.modules["scipy.stats"]).__name__ == "_LazyModule"  # not run yet

import torch
model = FactorizedPrior(8, 8).eval()
model.update(force=True)
x = torch.rand(1, 3, 64, 64)
out = model.compress(x)
assert model.decompress(out["strings"], out["shape"])["x_hat"].shape == x.shape

# compressai's own use of scipy.stats (a hyperprior's tables) loads it then
from compressai.models import ScaleHyperprior
hyper = ScaleHyperprior(8, 8).eval()
hyper.update(force=True)
assert type(sys.modules["scipy.stats"]).__name__ == "module"
import scipy.stats
assert scipy.stats.norm.ppf(0.5) == 0.0
out = hyper.compress(x)
assert hyper.decompress(out["strings"], out["shape"])["x_hat"].shape == x.shape

# the real packages come back whole once compressai is imported
import torch_geometric.transforms
import torchvision.transforms
from torchvision.ops import nms
assert not getattr(torch_geometric, "__taskcodec_stand_in__", False)
assert torch_geometric.transforms.BaseTransform.__module__.startswith("torch_geometric.transforms")
assert torchvision.transforms.ToTensor.__module__ == "torchvision.transforms.transforms"
import pandas
import requests
assert pandas.DataFrame({"a": [1, 2]}).shape == (2, 1)
assert not getattr(requests, "__taskcodec_stand_in__", False)
assert requests.Session.__module__ == "requests.sessions"
print("ok")
"""


def test_compressai_import_skips_point_cloud_and_torchvision():
    env = {**os.environ, "TASKCODEC_FULL_COMPRESSAI": "0"}
    proc = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")

