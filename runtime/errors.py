"""One-line errors for the command-line entry points (deleaker, deleaker-export, deleaker-bench)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

# Bad input (ValueError and its subclasses: config, entity, size, checkpoint, artifact errors)
# and file problems. Anything else is a bug and keeps its traceback (exit code 1).
USER_ERRORS = (ValueError, OSError)
USER_ERROR_EXIT_CODE = 2  # argparse's code for bad usage


def run_reporting_errors(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
    """Run fn(); a user error becomes `prog: error: message` on stderr and exit code 2.
    --debug or DELEAKER_DEBUG=1 prints the full traceback first; the exit code stays 2, so
    scripts see bad input the same way with or without it."""
    try:
        return fn()
    except USER_ERRORS as e:
        if debug or os.environ.get("DELEAKER_DEBUG"):
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
