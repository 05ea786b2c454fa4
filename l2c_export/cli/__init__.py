"""The ``l2c-export`` command line: the group, its error handling and exit codes, and the flag types the
commands share. Each stage's commands are in their own module below, registered on :func:`main` when
imported at the end of this one."""

from __future__ import annotations

import sys

import click

# Exit codes (documented in the README).
EXIT_CHECK_FAILED = 1  # the command ran and what it checks failed (verify beyond tolerance)
EXIT_BAD_INPUT = 2  # bad flags, files, fields or manifests: one line says which and what was expected
EXIT_BACKEND_UNAVAILABLE = 3  # the backend or optional dependency asked for is not installed or has no device here
EXIT_IO = 4  # the file system refused: disk full, read-only, permission, a parent that is a file
EXIT_INTERRUPTED = 130  # Ctrl-C


class CommandError(click.ClickException):
    """One line on stderr and a documented exit code, never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


class _Group(click.Group):
    """Turns the errors of every command into one clear line and an exit code. Internal errors (bugs) keep their
    traceback."""

    def invoke(self, ctx):
        from ..core.backends import BackendUnavailable  # light: no torch, so that serve and run start fast
        from ..core.extras import MissingExtra

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except (BackendUnavailable, MissingExtra) as error:
            raise CommandError(str(error), EXIT_BACKEND_UNAVAILABLE) from None
        # Every input error of the stages is a ValueError: CheckpointError, RouterError, ScheduleError, ManifestError,
        # OutputFolderError.
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(str(error), EXIT_BAD_INPUT) from None
        except OSError as error:
            raise CommandError(describe_os_error(error), EXIT_IO) from None
        except KeyboardInterrupt:
            raise CommandError("interrupted", EXIT_INTERRUPTED) from None

    def main(self, *args, **kwargs):
        """Click's main, except that every error is one line on stderr (click's usage errors print three)."""
        kwargs.pop("standalone_mode", None)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as error:
            click.echo(f"Error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.exceptions.Abort:
            click.echo("Error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(result if isinstance(result, int) else 0)


def describe_os_error(error: OSError) -> str:
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    return f"{where + ': ' if where else ''}{error.strerror or error}"


class Finite(click.ParamType):
    """A float flag that must be finite and in range (click's FloatRange lets NaN and infinity through)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        if too_low or (self.high is not None and number > self.high):
            low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
            high = "" if self.high is None else f"<= {self.high}"
            self.fail(f"{value} is out of range; expected a number {' and '.join(s for s in (low, high) if s)}",
                      param, ctx)
        return number


class ImageSize(click.ParamType):
    """``--image-size``: PIXELS (a square) or HxW (height x width, a video model's frames) -> int or (h, w)."""

    name = "PIXELS|HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)):
            return value
        text = str(value).strip().lower()
        parts = text.split("x")
        if len(parts) in (1, 2) and all(part.isdigit() and int(part) > 0 for part in parts):
            sizes = tuple(int(part) for part in parts)
            return sizes[0] if len(sizes) == 1 else sizes
        self.fail(f"{value!r}: expected a positive number of pixels or HEIGHTxWIDTH (for example 480x832)",
                  param, ctx)


IMAGE_SIZE = ImageSize()
THRESHOLD = Finite(0.0, 1.0)
MAC_FRACTION = Finite(0.0, 1.0, low_open=True)
CFG_SCALE = Finite(1.0)
POSITIVE = click.IntRange(min=1)
SEED = click.IntRange(min=0, max=2**63 - 1)
STEPS = click.IntRange(min=1, max=1000)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="l2c-export")
def main():
    """Learning-to-Cache for deployed Diffusion Transformers: schedules, export, engines, runtime."""


# The commands register themselves on ``main``.
from . import build, demo, learn, run, schedule, serving  # noqa: E402,F401  (isort: skip)
