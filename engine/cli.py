"""What every ``python -m engine.<command>`` shares: the help formatter, and the wrapper that turns a user's error
into one line.

``run_command(main, argv)``: a UserError (a bad flag, file, store, shard or checkpoint), a models.ModelError (an
unknown model, weights that do not load) or an OSError of the environment (full disk, read-only folder) is printed
as ``error: <one line>`` on stderr, exit status 2 (argparse's status for a bad command line); any other exception
is a bug and keeps its full traceback (exit status 1). Ctrl-C ends a command with exit status 130 and no
traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Optional, Sequence

from models import ModelError

from .core.errors import UserError
from .core.io import is_environment_error

STATED_DEFAULT = re.compile(r"\(default\b|\bdefault:")
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by Ctrl-C


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that shows each flag's default, except where its help already states the default in
    words ("(default: the embedded dataset)") and for ``--no-...`` switches (whose stored default, True, would
    read as the opposite), and prints docstring text without its reStructuredText markup."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if STATED_DEFAULT.search(text) or isinstance(action, argparse._StoreFalseAction):
            return text
        return super()._get_help_string(action)

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("``", ""))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace("``", "")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_command(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> None:
    """Run a command's ``main(argv)``; a user's error ends it with one line on stderr and exit status 2."""
    try:
        main(argv)
    except (UserError, ModelError) as exc:  # ModelError: an unknown model name, weights that do not load
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS) from None
    except KeyboardInterrupt:  # Ctrl-C: the run has said where it stopped and how to continue
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    except OSError as exc:
        if not is_environment_error(exc):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error:{where}: {exc.strerror or one_line(exc)}", file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS) from None
