"""caplab: see the CAP trade-off with real systems."""

__version__ = "0.1.0"
