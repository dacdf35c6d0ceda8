"""The version of experiment_io."""

__version__ = "0.2.0"
