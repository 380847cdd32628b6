"""`python -m edgeprune.cli`: the `edgeprune` command."""

from edgeprune.cli import main

main()
