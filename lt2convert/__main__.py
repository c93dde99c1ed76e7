"""`python -m lt2convert` (and `accelerate launch -m lt2convert ...`): the command line."""

from lt2convert.cli import main

main()
