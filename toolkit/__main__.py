"""`python -m toolkit` (also what `torchrun -m toolkit` runs)."""

from toolkit.cli import main

main()
