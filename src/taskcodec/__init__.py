"""taskcodec: learned image compression for humans and machines, as MLflow experiments."""

import warnings as _warnings

from taskcodec import _lean_compressai

__version__ = "0.1.0"

# CompressAI's import uses torch.jit.script, which torch >= 2.10 deprecates; not actionable here.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
# compressai's own import without its point-cloud dependencies: see _lean_compressai.
_lean_compressai.install()
