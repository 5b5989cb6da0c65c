"""`python -m pygemma4` runs the command line."""

from pygemma4.cli import main

main()
