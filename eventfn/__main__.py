"""`python -m eventfn` runs the command line."""

from eventfn.cli import main

main()
