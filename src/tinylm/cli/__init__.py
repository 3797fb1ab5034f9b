"""The `tinylm` command: parses arguments, calls the library, prints, sets the exit code.

Each command is a small function `cmd_NAME(args) -> int`. A TinylmError (a user mistake) ends in one line on stderr
and exit code 2.
"""

from __future__ import annotations

import sys

from tinylm.cli.parser import build_parser
from tinylm.errors import TinylmError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TinylmError as exc:
        print(f"tinylm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinylm sample ... | head`: the reader is gone, which is no error of ours
        return _closed_pipe()


def _closed_pipe() -> int:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again, and exit as a process killed by
    SIGPIPE does in a shell (128 + 13), the way `yes | head` ends."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor has nothing to flush there
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141
