"""``python -m DeepSalRegLib.cli``: the ``deepsalreg`` command (how Slicer's child process runs it)."""
import sys

from . import main

sys.exit(main())
