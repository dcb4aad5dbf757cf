"""`python -m genrec.cli`."""

from genrec.cli import main

main()
