"""Alias of ``python -m tfaccum.training`` (tfaccum/training/cli.py), kept so that
``python -m tfaccum.train`` (the README's form), the ``tfaccum-train`` script and code
importing this module work as before."""

from tfaccum.training.cli import FLAGS, main, parse, run, settings_from_flags  # noqa: F401

if __name__ == "__main__":
    from tfaccum.training.cli import command_line

    command_line()
