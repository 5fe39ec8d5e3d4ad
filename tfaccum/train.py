"""Alias of ``python -m tfaccum.training`` (tfaccum/training/cli.py), kept so that
``python -m tfaccum.train`` (the README's form), the ``tfaccum-train`` script and code
importing this module work as before."""

from tfaccum.training.cli import *  # noqa: F401,F403  (every public name, as before)
from tfaccum.training.cli import main  # noqa: F401  (the tfaccum-train console script)

if __name__ == "__main__":
    from tfaccum.training.cli import command_line

    command_line()
