"""The `rankserve` command line.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their subcommand runs, so `rankserve serve`
never imports torch and `rankserve --help` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib import metadata

from pydantic import ValidationError

from feature_store.errors import FeatureStoreError, UserError
from service.observability.logging_setup import LOG_LEVELS, configure_logging

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("models.data.synth", "write a deterministic synthetic event set at production scale"),
    "train": ("models.train", "train the multi-task ranker on a dataset (needs the train extra)"),
    "evaluate": ("models.evaluate", "offline evaluation: AUC, GAUC, logloss, WR@K, IA, baselines"),
    "export": ("export.exporter", "export a trained run to a versioned bundle (ONNX + TorchScript + tables)"),
    "verify-bundle": ("export.verify", "open a bundle without torch and verify its manifest and hashes"),
    "ingest": ("ingest.bulk", "bulk-load events into the online feature store"),
    "consume": ("ingest.stream", "append streamed behaviour events (the event log) to the lifelong sequences"),
    "recluster": ("ingest.recluster", "cluster stored histories again for twin_v2, streamed events included"),
    "serve": ("service.server", "run the REST and gRPC ranking server"),
    "bench": ("loadtest.bench", "run the benchmark suite and print JSON plus a markdown table"),
    "shadow-report": ("service.experiments.report", "summarize a shadow sink: agreement table (markdown) and a PNG"),
    "replay": ("service.experiments.replay",
               "re-send recorded requests (a shadow sink or a JSONL file) to a running service"),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


def version() -> str:
    """The installed package's version."""
    try:
        return metadata.version("rankserve")
    except metadata.PackageNotFoundError:  # a source tree run without installing it
        return "unknown (not installed)"


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of `rankserve`, with the arguments of `command`'s module when one is named."""
    parser = argparse.ArgumentParser(prog="rankserve", description="Online ranking microservice.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"rankserve {version()}")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                        help="logging level (default INFO; `serve`: RANKSERVE_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.log_level or "INFO")  # `serve` configures it again from its settings
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:  # what the user gave is wrong: say what, in one line, no traceback
        sys.stderr.write(f"rankserve {args.command}: error: {exc}\n")
        return 2
    except FeatureStoreError as exc:
        sys.stderr.write(f"rankserve {args.command}: feature store error: {exc}\n")
        return 1
    except ValidationError as exc:  # settings from flags and the environment (inputs hidden: they may hold passwords)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        sys.stderr.write(f"rankserve {args.command}: invalid settings: {problems}\n")
        return 2
    except KeyboardInterrupt:
        logging.getLogger("rankserve").warning("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
