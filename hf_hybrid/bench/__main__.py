"""``python -m hf_hybrid.bench [options]``: the ``hf-hybrid bench`` subcommand without the main CLI."""

from __future__ import annotations

import sys

from . import build_parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the bench; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
