"""``python -m benchmarks.gpu_check`` (from the tree's root): see the package docstring."""

import sys

from .runner import main

sys.exit(main())
