"""The ``sdze`` command line.

``sdze list`` shows the backends registered here and whether each can run
(with the reason when it cannot); ``sdze version`` prints the version.
"""

from __future__ import annotations

import argparse
import sys

import sdze


def _list(args) -> int:
    status = sdze.available_backends()
    width = max(map(len, status))
    print("backends (sdze.use(NAME); SDZE_BACKEND sets the default):")
    for name, reason in status.items():
        mark = "ok " if reason == "ok" else "-- "
        print(f"  {mark}{name:<{width}}  {'' if reason == 'ok' else reason}".rstrip())
    print(f"current default: {sdze.get_backend()!r}")
    return 0


def _version(args) -> int:
    print(f"sdze {sdze.__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdze", description=sdze.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="backends available here").set_defaults(run=_list)
    commands.add_parser("version", help="print the version").set_defaults(run=_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
