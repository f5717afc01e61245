"""`python -m toolkit` (also what `torchrun -m toolkit` runs)."""

from toolkit.cli import main

if __name__ == "__main__":  # not when `toolkit serve --workers` spawns a worker from this module
    main()
