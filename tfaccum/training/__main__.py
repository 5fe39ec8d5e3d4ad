"""``python -m tfaccum.training``: the training driver's command line
(tfaccum/training/cli.py, where the flags are documented)."""

from tfaccum.training.cli import command_line

if __name__ == "__main__":
    command_line()
