"""``python -m tfaccum.analysis``: the precision prediction's command line
(tfaccum/analysis/cli.py, where the flags are documented)."""

import sys

from tfaccum.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
