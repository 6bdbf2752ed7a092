"""What every ``ptuning-*`` command shares: every failure is one ``error: <message>`` line on stderr.

Exit codes: 0 success; 1 a failed check (parity; set by the command itself); 2 bad input (usage, files, values);
3 an internal error (a bug, or a dependency failing in a way we do not recognise): the full traceback goes to a
log file whose path the line names, never to the terminal; 130 interrupted (Ctrl-C).

Torch-free on purpose: the runtime CLI imports this and must not pull in torch.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

from ..errors import PtuningError

EXIT_USAGE = 2  # argparse's code for bad usage; we use it for every bad-input error too
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
LOG_DIR_ENV = "PTUNING_ONNX_LOG_DIR"  # where internal-error logs go (default: the system temp folder)
MAX_MESSAGE = 500  # characters of an internal error's message on the terminal; the log holds all of it

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


def write_crash_log(exc: BaseException, prog: str, argv: Optional[list]) -> str:
    """Write ``exc``'s full traceback to a new file; returns its path. Raises OSError when no file can be made.

    The file is new each time (``mkstemp``: never an existing file, readable by its owner only, since a
    traceback can show paths and inputs) under ``$PTUNING_ONNX_LOG_DIR`` when set, else the system temp folder.
    """
    folder = os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="ptuning-onnx-", suffix=".log", dir=folder)
    args = sys.argv if argv is None else sys.argv[:1] + [str(a) for a in argv]
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(f"{prog}: internal error at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        fh.write(f"argv: {args!r}\n")
        fh.write(f"python: {sys.version.split()[0]} ({sys.executable}); pid {os.getpid()}\n\n")
        fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def internal_error_line(exc: BaseException, prog: str, argv: Optional[list]) -> str:
    """``error: internal error: <Type>: <message> (traceback written to <path>)``, on one line."""
    message = " ".join(str(exc).split())
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    try:
        where = f"traceback written to {write_crash_log(exc, prog, argv)}"
    except OSError as log_exc:  # a full disk or an unwritable log folder must not bring the traceback back
        where = f"no traceback written: {error_message(log_exc)}"
    return f"error: internal error: {what} ({where})"


def run_cli(main: Callable[[Optional[list]], int]) -> Callable[[Optional[list]], int]:
    """Decorate ``main(argv) -> int`` so that every failure prints one ``error: ...`` line and returns its code.

    argparse's own exits (``--help``, bad flags) are returned as codes rather than raised, so ``main`` can be
    called in-process by tests. User errors return 2; any other exception is a bug: one line, exit 3, and the
    traceback in a log file (see ``write_crash_log``).
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
        except Exception as exc:  # a bug, not the user's doing: still one line, and a code of its own
            print(internal_error_line(exc, main.__module__, argv), file=sys.stderr)
            return EXIT_INTERNAL

    return wrapper
