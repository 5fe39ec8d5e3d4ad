"""Alias of ``python -m tfaccum.analysis`` (tfaccum/analysis/cli.py), kept so that
``python -m tfaccum.analyze``, the ``tfaccum-analyze`` script and code importing this
module work as before, errors still naming ``python -m tfaccum.analyze``."""

import sys
from typing import List, Optional

from tfaccum.analysis import cli
from tfaccum.analysis.cli import *  # noqa: F401,F403  (every public name, as before)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: returns the exit status (0, 1 for a failure, 2 for a bad flag)."""
    return cli.main(argv, prog="python -m tfaccum.analyze")


if __name__ == "__main__":
    sys.exit(main())
