"""Rules both launchers enforce, each written once: which variable names are credentials, a
tracking URI without credentials in it, tracking credentials that would not reach the job,
the time and quantity grammars, and the preemption exit code.

Pure and torch-free; every refusal is one :class:`ConfigError` line naming the option and the
value, and, for a credential, the safe way of each launcher to pass it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal

from taskcodec.errors import ConfigError
from taskcodec.signals import PREEMPTED_EXIT

__all__ = ["PREEMPTED_EXIT", "TRACKING_CREDENTIALS", "check_credential_names",
           "check_env_names", "check_tracking_uri", "is_credential_name", "parse_duration",
           "parse_quantity", "parse_time", "unreached_credentials"]

#: Tracking-server credentials a job needs when the user has them (mlflow reads these).
TRACKING_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                        "MLFLOW_TRACKING_TOKEN")

# A credential-looking name: a word that means a secret anywhere in it (DB_PASSWD, HF_APIKEY,
# AWS_SECRET_ACCESS_KEY), or a short word that does only as a whole part of the name (MY_TOKEN,
# GITHUB_PAT, SSH_KEY): KEYBOARD_LAYOUT, TOKENIZERS_PARALLELISM or COMPASS_DIR are harmless.
_CREDENTIAL = re.compile(
    r"PASSWORD|PASSWD|SECRET|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH_?TOKEN"
    r"|TOKEN(?!IZ)|(?:^|_)(?:PASS|PAT|KEYS?|AUTH)(?:$|_)", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_UNITS = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
                       r"(?P<suffix>[KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIX = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
           "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
           "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
           "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
           "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}


# -- credentials --------------------------------------------------------------------------------
def is_credential_name(name: str) -> bool:
    """True for a variable name that looks like it holds a secret (see ``_CREDENTIAL``)."""
    return bool(_CREDENTIAL.search(name))


def check_env_names(option: str, names: Iterable[str]) -> None:
    for name in names:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{option} {name!r} is not a valid environment variable name")


def check_credential_names(option: str, names: Iterable[str]) -> None:
    """Refuse credential-looking ``names`` given with ``option``, whose values would be written
    into the job script or manifest; the message names each launcher's safe alternative."""
    for name in names:
        if is_credential_name(name):
            raise ConfigError(
                f"{option} {name}: looks like a credential, and its value would be written into "
                f"the job; pass it without writing it: slurm-launch --pass-env {name} (from your "
                f"environment), k8s-launch --secret-env {name}=SECRET:KEY (from a Secret)")


def check_tracking_uri(uri: str) -> str:
    """Refuse a URI that carries a user or password: it would be written into the job."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is not None or (parts.username and parts.scheme.startswith("http")):
        raise ConfigError("the tracking URI holds credentials; put them in MLFLOW_TRACKING_USERNAME"
                          "/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead: "
                          "slurm-launch passes them without writing them, k8s-launch takes them "
                          "from a Secret (--secret-env NAME=SECRET:KEY)")
    return uri


def unreached_credentials(environ: Mapping[str, str], delivered: Iterable[str]) -> list[str]:
    """The tracking credentials set in ``environ`` that the job would not receive."""
    given = set(delivered)
    return [name for name in TRACKING_CREDENTIALS if environ.get(name) and name not in given]


# -- grammars -----------------------------------------------------------------------------------
def _slurm_seconds(match: re.Match) -> int:
    days, a, b, c = match.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # hours:minutes:seconds
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # minutes:seconds
        return int(a) * 60 + int(b)
    return int(a) * 60  # minutes


def parse_time(text: str) -> int | None:
    """Slurm time limit -> seconds (None for no limit); Slurm's own formats, e.g. ``90``,
    ``1:30:00``, ``2-00:00:00``, ``1-12``. A bare number is minutes, as for ``sbatch --time``."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _SLURM_TIME.match(value)
    if not m:
        raise ConfigError(f"--time {text!r} is not a Slurm time (e.g. 90, 1:30:00, 2-00:00:00)")
    seconds = _slurm_seconds(m)
    if seconds <= 0:
        raise ConfigError(f"--time {text!r} must be longer than zero")
    return seconds


def parse_duration(text: str, option: str) -> int:
    """Seconds from ``90s``, ``30m``, ``12h``, ``2d``, ``1h30m``, or any Slurm time (a bare
    number is minutes, as in Slurm, so one ``--time`` means the same to both launchers)."""
    raw = str(text).strip()
    units = _UNITS.fullmatch(raw)
    if raw and units and any(units.groups()):
        d, h, m, s = (int(g or 0) for g in units.groups())
        return ((d * 24 + h) * 60 + m) * 60 + s
    slurm = _SLURM_TIME.match(raw)
    if slurm:
        return _slurm_seconds(slurm)
    raise ConfigError(f"{option} {text!r} is not a duration "
                      "(examples: 90m, 12h, 2d, 1h30m, 1-00:00:00)")


def parse_quantity(text: str, option: str) -> Decimal:
    """A Kubernetes quantity (``16Gi``, ``500m``, ``8G``, ``1.5``) as a number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ConfigError(f"{option} {text!r} is not a Kubernetes quantity "
                          "(examples: 16Gi, 512Mi, 8G, 500m, 2)")
    number = Decimal(match["num"])
    suffix = match["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** int(suffix[1:])
    return number * _SUFFIX[suffix]
