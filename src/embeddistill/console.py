"""The command line's console: logging levels (-v / -q), help formatting, and how a subcommand is declared.

Shared by :mod:`embeddistill.cli` and :mod:`embeddistill.cli_serving`; imports nothing heavy, so that
``embeddistill --help`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

VERBOSITY = {"level": 0}  # -q: -1, default: 0, -v: 1, -vv: 2 (set by main)
QUIET_LIBRARIES = ("httpx", "urllib3", "sentence_transformers", "transformers", "filelock", "faiss", "torch")


def _console_only(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True)


def setup_logging(log_file: Path | None = None) -> None:
    """Console: embeddistill's own INFO lines (WARNING with -q, DEBUG with -v), other libraries' warnings only (their
    INFO too with -vv; faiss's loader logs eight lines per start otherwise). ``log_file`` gets INFO and up."""
    verbosity = VERBOSITY["level"]
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG)
    console.addFilter(_console_only)
    detailed = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    console.setFormatter(logging.Formatter(detailed if verbosity > 0 else "%(asctime)s %(message)s", "%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        handlers[-1].setFormatter(logging.Formatter(detailed))
        handlers[-1].setLevel(logging.INFO)
    logging.basicConfig(level=logging.WARNING, handlers=handlers, force=True)
    logging.getLogger("embeddistill").setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.INFO if verbosity > 1 else logging.WARNING)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, except where the help says it already or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, "", False, argparse.SUPPRESS) and not action.required
        if not shown or "default" in text or not (action.option_strings or action.nargs in ("?", "*")):
            return text
        return f"{text} (default: %(default)s)"


def common_options() -> argparse.ArgumentParser:
    """-v / -q, accepted before or after the command (SUPPRESS: a subcommand does not reset the top level's)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more detail (-vv: other libraries' too)"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only, no bars"
    )
    return common


def add_command(commands, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help, description=description, formatter_class=DefaultsFormatter, parents=[common_options()]
    )


class IntermixedArgumentParser(argparse.ArgumentParser):
    """A subcommand parser that lets options sit between positionals (``search INDEX --model M QUERY ...``)."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def at_least(minimum: float, kind: type = int):
    """An argparse ``type`` that also checks a lower bound: ``--k 0`` is an error naming the flag, not a crash later."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
