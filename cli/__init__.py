"""The ``saekit`` command line. Every option comes from a config dataclass (simple_parsing),
so the CLI, the Python API and the saved configs share one definition; each command's
options are defined beside the command (model.py, train.py, evaluate.py, tools.py).

Bad input ends with one line on stderr, ``saekit CMD: error: ...``, and exit code 2.
Heavy imports (torch, transformer-lens) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import logging
import os
import sys

import simple_parsing as sp

from saekit.cli import evaluate, model, tools, train
from saekit.errors import SaekitError

# name -> (function, () -> [(options dataclass, dest)]), in the order `saekit --help` lists them
COMMANDS = {**model.COMMANDS, **train.COMMANDS, "bench": tools.COMMANDS["bench"], **evaluate.COMMANDS,
            "app": tools.COMMANDS["app"]}


class UsageError(SaekitError):
    """Bad command-line syntax, raised by the parser instead of argparse's usage dump."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see `{prog} --help`)")
        self.prog = prog


class Parser(sp.ArgumentParser):
    """argparse whose errors become one-line ``UsageError``s."""

    def error(self, message):  # noqa: D102 - argparse API
        raise UsageError(self.prog, message)


def build_parser() -> Parser:
    p = Parser(prog="saekit", description="Train and study sparse autoencoders on transformer "
               "activations.", add_option_string_dash_variants=sp.DashVariant.DASH,
               add_config_path_arg=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, groups) in COMMANDS.items():
        sp_ = sub.add_parser(name, help=fn.__doc__.splitlines()[0], description=fn.__doc__,
                             add_option_string_dash_variants=sp.DashVariant.DASH,
                             add_config_path_arg=False)
        for cls, dest in groups():
            sp_.add_arguments(cls, dest=dest, default=None)
    return p


def _setup_logging() -> None:
    """saekit's INFO lines (e.g. which kernel implementation runs) go to stderr once each."""
    class StderrHandler(logging.StreamHandler):
        """Writes to the current ``sys.stderr`` (which tests and callers may swap), not the
        one that existed when the handler was made."""

        stream = property(lambda self: sys.stderr, lambda self, value: None)

    log = logging.getLogger("saekit")
    if not log.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _setup_logging()
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"saekit {command}" if command in COMMANDS else "saekit"
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command][0](args)
    except SaekitError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the error: say it once
            sys.stderr.write(f"{getattr(e, 'prog', prog)}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
