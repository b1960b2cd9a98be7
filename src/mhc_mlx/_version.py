import os
import re
from importlib.metadata import PackageNotFoundError, version


def _source_tree_version() -> str | None:
    """The version pyproject.toml declares, for a source tree used without installing it (e.g.
    on PYTHONPATH on a GPU machine with no package index): '<version>+source'."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    except OSError:
        return None
    return f"{found.group(1)}+source" if found else None


try:
    __version__ = version("mhc-mlx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = _source_tree_version() or "0+unknown"
