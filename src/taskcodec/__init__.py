"""taskcodec: learned image compression for humans and machines, as MLflow experiments."""

__version__ = "0.1.0"

import warnings as _warnings

# CompressAI's import uses torch.jit.script, which torch >= 2.10 deprecates; not actionable here.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
