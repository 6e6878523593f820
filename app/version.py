"""The installed version of Taskgate (the package metadata), for the API and the OpenAPI document."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("taskgate")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0"
