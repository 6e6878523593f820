"""Taskgate's version, for the API, the OpenAPI document and the workers list.

`make run` and the images install the dependencies only (`uv sync --no-install-project`, `package =
false`), so no package metadata names Taskgate there: the version is read from the pyproject.toml
beside the package, and from the metadata only where Taskgate was installed as a package.
"""

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    try:
        with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as handle:
            project = tomllib.load(handle).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        project = {}
    if project.get("name") == "taskgate" and isinstance(project.get("version"), str):
        return str(project["version"])
    try:
        return version("taskgate")
    except PackageNotFoundError:  # pragma: no cover - neither a source tree nor an installed package
        return "0.0.0"


__version__ = _version()
