"""`python -m edgeprune.build.bench [suite ...]`: run benchmark suites (all without arguments) into bench-results/.

Errors end as one line and exit status 2, interruptions as 130, like the `edgeprune` command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgeprune.core.atomic import install_signal_handlers
from edgeprune.core.console import EXIT_INTERRUPTED, EXIT_USER_ERROR, progress
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.bench import PART_OF, SUITES, suite_runner
from edgeprune.build.bench.tables import machine, write_suite


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgeprune.build.bench", description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"one of {', '.join(SUITES)} (default: all but {', '.join(PART_OF)}, parts of others)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}: choose from {', '.join(SUITES)}")
    install_signal_handlers()
    try:
        for name in args.suites or [s for s in SUITES if s not in PART_OF]:
            progress(f"suite {name}: starting")
            started, host = time.time(), machine()
            result = suite_runner(name)(progress)
            for path in write_suite(args.out, name, result, started, host):
                progress(f"suite {name}: wrote {path}")
    except EdgepruneError as exc:
        print(f"edgeprune.build.bench: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("edgeprune.build.bench: interrupted; finished suites are written, the running one is not", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
