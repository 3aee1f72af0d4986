"""fgh's version, read once from the installed distribution (core: imports nothing of fgh)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fgh")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
