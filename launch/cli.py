"""What every `python -m launch.*` command line shares: one spelling per flag and a --help that shows
each option's default.

- No abbreviations (`allow_abbrev=False`): argparse would otherwise take `--zero` for `--zero-stage`, so
  a flag would have as many spellings as it has unambiguous prefixes.
- The description and epilog print as written; an option's help gets " (default: X)" appended unless it
  already says what its default is. A default of None means "derived" and must say from what in the help
  (tests/integration/test_launch_cli.py checks every option of every launch command).
- A renamed flag keeps its old spelling only to refuse it, naming the new one (`refuse_old_spelling`).
- A mistake on the command line is one line (a ConfigError), as every other refusal (launch/refusal.py).
"""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            action = copy.copy(action)  # argparse prints no help line for an option without help text
            action.help = " "
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A command-line mistake is one line, like every other refusal (argparse prints the usage first)."""
        from launch.configs import ConfigError

        raise ConfigError(f"{message} (see {self.prog} --help)")


def parser(**kwargs) -> argparse.ArgumentParser:
    """The launch commands' ArgumentParser: no abbreviations, defaults shown, one-line errors."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return Parser(allow_abbrev=False, **kwargs)


class _OldSpelling(argparse.Action):
    def __call__(self, p, namespace, values, option_string=None):
        from launch.configs import ConfigError

        raise ConfigError(
            f"{option_string} is spelled {self.metavar} now (as in python -m launch.pretrain); "
            f"use {self.metavar}" + (f" {values}" if values not in (None, []) else "")
        )


def refuse_old_spelling(p: argparse.ArgumentParser, old: str, new: str, takes_value: bool = True) -> None:
    """Accept `old` on the command line only to stop with "old is spelled new now" (hidden from --help)."""
    p.add_argument(
        old,
        action=_OldSpelling,
        metavar=new,
        nargs=None if takes_value else 0,
        help=argparse.SUPPRESS,
        dest=argparse.SUPPRESS,
    )
