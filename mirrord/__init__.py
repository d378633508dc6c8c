"""mirrord: keeps fragment-screening data moving between Fragalysis, ISPyB, PDIS and Design Hub."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mirrord")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
