"""``python -m slice_kernels``: the runner's command line (the application's entry point, not a library module)."""

import sys

from .runner.cli import main

sys.exit(main())
