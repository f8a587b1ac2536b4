"""The ``taskguard`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys

from taskguard import __version__, config


def _serve(args: argparse.Namespace) -> int:
    from taskguard import server

    try:
        settings = config.load(args)
    except config.ConfigError as error:
        print(f"taskguard: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(server.run(settings))
    except Exception as error:  # start-up failures: one clear line, no traceback
        print(f"taskguard: cannot start: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskguard", description="Task Guard sidecar and tools")
    parser.add_argument("--version", action="version", version=f"taskguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar")
    config.add_arguments(serve)
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code
