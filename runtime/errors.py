"""One-line errors for the command-line entry points (deleaker, deleaker-export, deleaker-bench)."""

from __future__ import annotations

import os
import sys
from typing import Callable

# Bad input (ValueError and its subclasses: config, entity, size, checkpoint, artifact errors)
# and file problems. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def run_reporting_errors(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
    """Run fn(); a user error becomes `prog: error: message` on stderr and exit code 2.
    --debug or DELEAKER_DEBUG=1 re-raises it with the full traceback."""
    try:
        return fn()
    except USER_ERRORS as e:
        if debug or os.environ.get("DELEAKER_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
