"""The help formatter of every ``python -m`` command of the project."""
import argparse
import re

STATED_DEFAULT = re.compile(r"\(default\b|\bdefault:")


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
