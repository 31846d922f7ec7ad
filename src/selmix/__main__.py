"""``python -m selmix``: the same command line as ``selmix``."""

import sys

from selmix.cli import main

if __name__ == "__main__":
    sys.exit(main())
