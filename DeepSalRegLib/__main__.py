"""``python -m DeepSalRegLib ...`` is the ``deepsalreg`` command."""
import sys

from .cli import main

sys.exit(main())
