"""`aaq` command line: each command (one module here) turns its flags into the library's configs and calls one library function."""

import argparse
import contextlib
import errno
import logging
import sys
from collections.abc import Sequence

from aaq.cli import audit, demo, diagnose, evaluate, export, make_demo_pair, options, plan, quantize, report
from aaq.errors import AaqError, settings_named_by
from aaq.runs.records import git_commit
from aaq.runtime import distributed

COMMANDS = (quantize, plan, evaluate, report, demo, make_demo_pair, diagnose, export, audit)
EXAMPLES = """examples:
  aaq quantize --model smollm2-135m-instruct --method quarot --bits w4a4kv4 --out runs/quarot
  aaq eval --model runs/quarot --tasks ppl --out runs/quarot/eval
  aaq export runs/quarot --format compressed-tensors --scheme W4A4 --out runs/quarot-vllm
  aaq audit --original smollm2-135m-safe --quantized model.Q4_0.gguf runs/quarot --out runs/audit --fail-if "harmful_complied>+0.05"
  aaq demo"""


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line that says where help is, instead of the whole usage."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks, and shows a default only when there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.default not in (None, False) and "(default" not in (action.help or "")
        return super()._get_help_string(action) if shown else action.help or ""


def build_parser() -> argparse.ArgumentParser:
    """The `aaq` argument parser with all subcommands (each described by its module's docstring)."""
    parser = _Parser(prog="aaq", description="Alignment-aware 4-bit quantization (W4A4KV4 and friends) of transformers LLMs.", epilog=EXAMPLES, formatter_class=_Help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        summary = command.__doc__.splitlines()[0].rsplit(" (", 1)[0]
        p = sub.add_parser(command.NAME, help=summary[0].lower() + summary[1:], description=command.__doc__, formatter_class=_Help)
        command.add_arguments(p)
        p.set_defaults(handler=command.run, parser=p)
    return parser


def _check_processes(command: str) -> None:
    """Under torchrun (several processes) only quantize splits its work, and only process 0 shows progress bars."""
    if command != "quantize":
        raise AaqError(f"aaq {command} runs in one process; start it without torchrun (only aaq quantize splits its work over processes)")
    if not distributed.launched().is_main:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `aaq` console script: runs one command, prints a library error as one line and exits 2."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the command's own parser names its help, not the top-level one
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    this = distributed.launched()
    level = logging.WARNING if not this.is_main else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        with settings_named_by(options.flag), distributed.sigterm_as_error() if this.size > 1 else contextlib.nullcontext():
            if this.size > 1:
                _check_processes(args.command)
            git_commit()  # record the commit of the code as loaded, before a long run
            return args.handler(args)
    except AaqError as err:
        print(f"aaq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aaq: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        # A full disk can stop any library's write (a datasets or hub cache, say); aaq's own writes say so themselves.
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"aaq: error: {err.strerror} ({err.filename or 'while writing'}); free some disk space and run again", file=sys.stderr)
        return 2
