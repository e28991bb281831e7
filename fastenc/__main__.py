"""``python -m fastenc``: the command line."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a worker process of fastenc serve is spawned
    sys.exit(main())
