"""``python -m aqlm``: see :mod:`aqlm.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
