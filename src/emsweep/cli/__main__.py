"""`python -m emsweep.cli ...`, as the `emsweep` script."""

from emsweep.cli import app

if __name__ == "__main__":
    app()
