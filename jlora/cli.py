"""The ``jlora`` command line: ``jlora inspect`` and ``jlora merge`` (no torch needed for either).

Bad input (any :class:`jlora.AdapterError`) prints the message on stderr and exits with status 2;
other I/O failures exit with 1. Messages go through logging (the ``jlora`` loggers), one ``jlora COMMAND: error: ...``
or ``jlora COMMAND: warning: ...`` line each (Python warnings raised during the run included, without their
source lines); the handler and ``warnings.showwarning`` are set for the run only.

Example:
    $ jlora inspect user/my-adapter --json
    $ jlora merge --base meta-llama/Llama-3.2-1B --adapter user/my-adapter --out merged
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import AdapterError

LOGGER = logging.getLogger("jlora.cli")
_PACKAGE = Path(__file__).resolve().parent

SOURCE_HELP = "a local folder or a Hugging Face Hub repo id (user/repo)"
EPILOG = ("Hub access uses huggingface_hub: the token from `hf auth login` or HF_TOKEN, the cache in HF_HOME, "
          "HF_ENDPOINT, and HF_HUB_OFFLINE=1 to work from the cache only. Exit status: 0 success, 2 bad input "
          "(the message says what is wrong), 1 other failures (disk, permissions).")


def _inspect(args: argparse.Namespace) -> int:
    from .describe import describe_adapter, format_description

    info = describe_adapter(args.source, revision=args.revision, subfolder=args.subfolder)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .merge_checkpoint import merge_checkpoint

    out = merge_checkpoint(args.base, args.adapter, args.out, base_revision=args.base_revision,
                           revision=args.revision, subfolder=args.subfolder, progress=not args.no_progress)
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jlora`` (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="jlora", description="Hugging Face PEFT LoRA adapters: inspect them, merge them into checkpoints.",
        epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="describe an adapter: type, rank/alpha, scale, modules per layer, size, dtypes",
        description="Describe a PEFT LoRA adapter from its adapter_config.json and the header and tensors of "
                    "adapter_model.safetensors (no model needed): peft type, rank and alpha (with rank/alpha "
                    "patterns), scale, the adapted modules grouped by name with their layers, per-layer coverage, "
                    "parameter count, bytes, dtypes and tensors with NaN or Inf.", epilog=EPILOG)
    inspect.add_argument("source", metavar="SOURCE", help=f"the adapter: {SOURCE_HELP}")
    inspect.add_argument("--revision", metavar="R", help="Hub branch, tag or commit of the adapter (default: main)")
    inspect.add_argument("--subfolder", metavar="S", help="folder inside SOURCE that holds the adapter files")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(func=_inspect)

    merge = commands.add_parser(
        "merge", help="merge an adapter into a safetensors checkpoint (no torch), writing a new checkpoint",
        description="Merge a PEFT LoRA adapter into a Hugging Face PyTorch-format safetensors checkpoint "
                    "(model.safetensors, or shards listed in model.safetensors.index.json) as PEFT's "
                    "merge_and_unload() does, without torch and one shard at a time (peak memory about one "
                    "shard plus the adapter). Config, tokenizer and other non-weight files are copied; other "
                    "weight formats (*.bin, *.pt, ...) are not. OUT must be new or empty; it appears only "
                    "when the merge is complete.", epilog=EPILOG)
    merge.add_argument("--base", required=True, metavar="BASE", help=f"the base checkpoint: {SOURCE_HELP}")
    merge.add_argument("--adapter", required=True, metavar="SOURCE", help=f"the adapter: {SOURCE_HELP}")
    merge.add_argument("--out", required=True, metavar="DIR", help="the folder to write the merged checkpoint to")
    merge.add_argument("--revision", metavar="R", help="Hub branch, tag or commit of the adapter (default: main)")
    merge.add_argument("--subfolder", metavar="S", help="folder inside the adapter SOURCE that holds its files")
    merge.add_argument("--base-revision", metavar="R", help="Hub branch, tag or commit of BASE (default: main)")
    merge.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    merge.set_defaults(func=_merge)
    return parser


class _TerminalFormatter(logging.Formatter):
    """``prog: warning: message`` (the level's name, or a record's ``label``: ``failed``, none), without a
    leading ``prog:`` the message already has."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().removeprefix(f"{self.prog}: ")
        label = getattr(record, "label", record.levelname.lower())
        return f"{self.prog}: {label}: {text}" if label else f"{self.prog}: {text}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the CLI: one logged line; jlora's own warnings as their message alone,
    others' with their category and place (no source line)."""
    text = str(message)
    if not Path(filename).resolve().is_relative_to(_PACKAGE) and not text.startswith("jlora"):
        text += f" [{category.__name__}, {Path(filename).name}:{lineno}]"
    LOGGER.warning(text)


@contextlib.contextmanager
def _terminal_messages(prog: str) -> Iterator[None]:
    """For one run: the ``jlora`` loggers' warnings and errors go to stderr as ``prog: level: message``, and
    so do Python warnings; all is put back afterwards (library users keep normal warnings and logging)."""
    root = logging.getLogger("jlora")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TerminalFormatter(prog))
    saved = root.level, root.propagate
    root.setLevel(logging.WARNING)
    root.propagate = False
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning and the filters on exit
            warnings.showwarning = _show_warning
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    """Run ``jlora`` with ``argv`` (default: the command line); the exit status.

    Example:
        >>> main(["inspect", "path/to/adapter", "--json"])
        0
    """
    args = build_parser().parse_args(argv)
    with _terminal_messages(f"jlora {args.command}"):
        try:
            return args.func(args)
        except AdapterError as err:
            LOGGER.error(str(err))
            return 2
        except OSError as err:
            LOGGER.error(str(err), extra={"label": "failed"})
            return 1
        except KeyboardInterrupt:
            LOGGER.error("interrupted", extra={"label": ""})
            return 130


def run() -> None:
    """The ``jlora`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
