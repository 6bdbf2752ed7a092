"""What every ``ptuning-*`` command shares: user errors become one ``error: <message>`` line and exit code 2.

Torch-free on purpose: the runtime CLI imports this and must not pull in torch.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

from ..errors import PtuningError

EXIT_USAGE = 2  # argparse's code for bad usage; we use it for every bad-input error too
EXIT_INTERRUPTED = 130

# Errors that come from what the user gave us (paths, permissions), as opposed to bugs in this package.
USER_ERRORS = (PtuningError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               FileExistsError)


def error_message(exc: BaseException) -> str:
    """One line describing ``exc`` for a user: OS errors name the path, newlines are folded."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        message = f"{exc.strerror}: {exc.filename}"
    else:
        message = str(exc) or type(exc).__name__
    return " ".join(message.split())


def run_cli(main: Callable[[Optional[list]], int]) -> Callable[[Optional[list]], int]:
    """Decorate ``main(argv) -> int`` so that user errors print ``error: ...`` to stderr and return 2.

    argparse's own exits (``--help``, bad flags) are returned as codes rather than raised, so ``main`` can be
    called in-process by tests. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(argv: Optional[list] = None) -> int:
        try:
            return int(main(argv) or 0)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            print(f"error: {exc.code}", file=sys.stderr)  # sys.exit("message")
            return EXIT_USAGE
        except USER_ERRORS as exc:
            print(f"error: {error_message(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper
