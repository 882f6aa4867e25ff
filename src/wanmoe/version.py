"""The package version (read by the sidecar and by packaging)."""

__version__ = "0.1.0"
