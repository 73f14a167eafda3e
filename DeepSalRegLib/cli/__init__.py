"""The ``deepsalreg`` command line: register, warp, batch, demo (``parser.py`` the arguments, ``commands.py``
what each command does, ``output.py`` what it prints; the engine is the rest of ``DeepSalRegLib``).

Exit codes: 0 success; 1 internal error (a bug: the traceback is printed); 2 bad input; 3 model or
weights problem; 4 requested device unavailable; 5 output not writable; 6 batch finished with failed
pairs; 130 interrupted. A user error is one line on stderr, never a traceback.
"""
from __future__ import annotations

import sys
import warnings

from ..errors import DeepSalRegError
from ..threads import choose_wait_policy
from .commands import EXIT_INTERRUPTED, EXIT_OK
from .parser import build_parser

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_INTERRUPTED"]


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"deepsalreg: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    # OpenMP threads spin briefly on an idle machine and sleep on a busy one (threads.py: measured both
    # ways). Chosen before torch is first imported; the user's value wins.
    choose_wait_policy()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if args.command is None:
        parser.print_help()
        return 2
    if (getattr(args, "iterations", None) or 0) < 0:
        parser.error("--iterations must be >= 0")
    if getattr(args, "time_budget", None) is not None and not args.time_budget > 0:
        parser.error("--time-budget must be a positive number of seconds")
    warnings.showwarning = _warning_line
    try:
        return args.func(args)
    except DeepSalRegError as exc:
        print(f"deepsalreg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("deepsalreg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("deepsalreg: error: out of memory; try a smaller --max-voxels or --device cpu", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            print("deepsalreg: error: the device ran out of memory; try a smaller --max-voxels or --device cpu",
                  file=sys.stderr)
            return 3
        raise
