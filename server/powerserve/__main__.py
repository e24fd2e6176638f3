"""``python -m powerserve ...``: the same entry point as the ``powerserve`` console script."""

from __future__ import annotations

import sys

from powerserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
