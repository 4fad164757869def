"""`python -m edgetl ...` (what `torchrun -m edgetl train ...` starts in every process)."""

from edgetl.cli.main import run

if __name__ == "__main__":
    run()
