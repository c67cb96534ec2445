"""`python -m hallu` is the `hallu` command."""

from hallu.commands import main

main()
