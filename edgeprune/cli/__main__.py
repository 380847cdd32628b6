"""`python -m edgeprune.cli`: the `edgeprune` command."""

from edgeprune.cli import main

if __name__ == "__main__":
    main()
