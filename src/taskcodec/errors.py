"""The errors a user can meet. Each carries one line that says what was wrong and with what.

``ValueError`` subclasses are bad arguments; the others are failures of a domain object
(a corrupt bitstream, a data set that cannot be read, a tracking server that is away).
CLI commands turn any :class:`TaskcodecError` into one ``Error: ...`` line and exit status 2.
"""


class TaskcodecError(Exception):
    """Base class of every error taskcodec reports to a user."""


class ConfigError(TaskcodecError, ValueError):
    """A setting is unknown, of the wrong type or out of range."""


class DataError(TaskcodecError):
    """A data set or one of its files cannot be used (names the file)."""


class BitstreamError(TaskcodecError):
    """A compressed file is truncated, corrupt, foreign or made by another checkpoint."""


class DesyncError(BitstreamError):
    """A file decoded to other symbols than its encoder coded: the entropy parameters differ."""


class EncodeError(TaskcodecError):
    """An image cannot be entropy-coded with these weights (a latent beyond the coder's range)."""


class CheckpointError(TaskcodecError):
    """A checkpoint cannot be found or loaded."""


class TrackingError(TaskcodecError):
    """The MLflow tracking server cannot be reached or refused a request."""


class TrainingError(TaskcodecError):
    """Training cannot go on (for example a non-finite loss)."""
