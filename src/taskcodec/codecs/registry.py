from __future__ import annotations

from torch import nn

from taskcodec.errors import ConfigError
from taskcodec.registry import Registry

CODECS: Registry[nn.Module] = Registry("codec")


def build_codec(name: str, *, N: int, M: int) -> nn.Module:
    """Build a codec from the registry with its size parameters (untrained weights)."""
    for label, value in (("N", N), ("M", M)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f'Invalid {label} "{value}" for codec {name}, should be >= 1')
    return CODECS.build(name, N=N, M=M)
