"""`python -m dvk_cffi`: tools for the DVK boundary.

    python -m dvk_cffi layout [--i386] [--struct NAME ...] [--top]

prints each struct's size and field offsets for this machine (native) or for the i386
wire/emulator layout, to check a build against the kernel on a DVS node.
"""

from __future__ import annotations

import argparse
import sys

from . import layout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dvk_cffi", description="Tools for the DVK kernel boundary (dvk_cffi).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    lay = sub.add_parser(
        "layout", help="print struct sizes and field offsets",
        description="Print the size and field offsets of every struct passed to the DVK "
                    "in this machine's native layout or, with --i386, in the "
                    "i386 layout used on the wire and by the emulator.")
    lay.add_argument("--i386", action="store_true",
                     help="show the i386 wire/emulator layout instead of the native one")
    lay.add_argument("--struct", action="append", metavar="NAME", dest="structs",
                     help="only this struct (repeatable), e.g. cmd_t")
    lay.add_argument("--top", action="store_true",
                     help="top-level fields only (do not expand nested structs and unions)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "layout":
        known = layout.struct_names(args.i386)
        for name in args.structs or ():
            if name not in known:
                print(f"unknown struct {name!r}; known: {', '.join(known)}", file=sys.stderr)
                return 2
        items = layout.layouts(args.i386, args.structs, nested=not args.top)
        sys.stdout.write(layout.format_layouts(items, layout.describe_host(args.i386)))
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
