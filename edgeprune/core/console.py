"""How edgeprune's commands talk to a terminal: timestamped progress lines on stderr, and the exit statuses.

The `edgeprune` command and `python -m edgeprune.build.bench` share them, so both read and exit alike.
"""

from __future__ import annotations

import time

import click

_START = time.perf_counter()
EXIT_BUDGET_MISSED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130


def progress(message: str) -> None:
    click.echo(f"[{time.perf_counter() - _START:7.1f}s] {message}", err=True)
