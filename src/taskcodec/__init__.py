"""taskcodec: learned image compression for humans and machines, as MLflow experiments."""

__version__ = "0.1.0"
