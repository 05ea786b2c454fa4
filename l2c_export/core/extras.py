"""The optional dependencies: every import of diffusers and transformers goes through :func:`import_extra`, so that an
install without them (``pip install l2c-export``: embedded models and builds, prompt builds at run time) refuses a
diffusers folder in one line naming the command that installs them, not with a traceback."""

from __future__ import annotations

import importlib
import importlib.util

# top-level module -> the extra of setup.py that installs it
EXTRAS = {"diffusers": "diffusers", "transformers": "diffusers"}


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message names what needs it and the pip command to install it.
    The CLI exits 3 (not installed here), as for a missing backend."""


def install_command(extra: str) -> str:
    return f'pip install "l2c-export[{extra}]"'


def import_extra(module: str, needed_for: str = "reading a diffusers folder"):
    """``importlib.import_module(module)`` for a module of an optional dependency (:data:`EXTRAS`: ``diffusers``,
    ``diffusers.models.attention``, ``transformers``, ...), or :class:`MissingExtra` naming ``needed_for`` and the
    install command when it (or something it imports) is not installed."""
    top = module.partition(".")[0]
    extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or top
        what = top if missing.partition(".")[0] == top else f"{top} (it needs {missing})"
        raise MissingExtra(f"{needed_for} needs {what}, which is not installed: {install_command(extra)}") from None


def require_extra(module: str, needed_for: str = "reading a diffusers folder") -> None:
    """:class:`MissingExtra` (as :func:`import_extra`'s) where the optional dependency ``module`` is not installed,
    found without importing it: diffusers and transformers take seconds to import, which a folder refused for a bad
    field should not pay."""
    top = module.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        raise MissingExtra(f"{needed_for} needs {top}, which is not installed: {install_command(EXTRAS[top])}")
