"""`python -m genrec ...`: the CLI without the console script (e.g. from a PYTHONPATH checkout)."""

from genrec.cli import main

main()
