"""``python -m tests.demo``: see :mod:`tests.demo` and ``--help``."""

from __future__ import annotations

import sys

from tests.demo.main import main

if __name__ == "__main__":
    sys.exit(main())
