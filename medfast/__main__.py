"""``python -m medfast``: the same as the ``medfast`` console script."""

import sys

from medfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
