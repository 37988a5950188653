"""One-line errors for the command-line entry points (deleaker, deleaker-export, deleaker-bench, deleaker eval)."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Callable

# Bad input (ValueError and its subclasses: config, entity, size, checkpoint, artifact errors)
# and file problems. Anything else is a bug and keeps its traceback (exit code 1).
USER_ERRORS = (ValueError, OSError)
USER_ERROR_EXIT_CODE = 2  # argparse's code for bad usage
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: what shells report for Ctrl-C


class FieldError(ValueError):
    """Bad input that one field of a request is to blame for. `field` names it, as the Python API
    spells it (prompt, entities, seed, steps, size, guidance_scale, deleaker, config; a subclass
    sets the field it is always about); the server answers it as the API field (runtime/request.py,
    API_FIELDS). None: the input as a whole."""

    field: str | None = None

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field


def _debug(debug: bool) -> bool:
    return debug or bool(os.environ.get("DELEAKER_DEBUG"))


def run_reporting_errors(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
    """Run fn(); a user error becomes `prog: error: message` on stderr and exit code 2, Ctrl-C
    (KeyboardInterrupt) becomes `prog: interrupted` and exit code 130. Writers publish their
    files by rename, so an interrupted command leaves no half-written output.
    --debug or DELEAKER_DEBUG=1 prints the full traceback first; the exit code stays the same, so
    scripts see bad input the same way with or without it."""
    try:
        return fn()
    except USER_ERRORS as e:
        if _debug(debug):
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        if _debug(debug):
            traceback.print_exc(file=sys.stderr)
        # a second Ctrl-C while the message is printed must not turn into a traceback either
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
