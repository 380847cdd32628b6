"""The `edgeprune` command line: export, prune, plan, validate, init, build, report and profiles.

Every user error ends as one line on stderr and exit 2; an internal error as one line and exit 3, with the
traceback in a log file; Ctrl-C and SIGTERM unwind through the same cleanup (exit 130), so no half-written
file is left under a final name. Each command lives in its own module and only turns its flags into a call.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import click

from edgeprune.core.atomic import install_signal_handlers
from edgeprune.core.codedigest import version_string
from edgeprune.core.console import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR
from edgeprune.core.errors import EdgepruneError

EXIT_CODES_HELP = ("Exit status: 0 pass (or done), 1 a budget of the profile was missed, 2 bad input (one line on "
                   "stderr says what and how to fix it), 3 an internal error (one line; the traceback is in the log "
                   "file it names), 130 interrupted.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES_HELP)
@click.version_option(version=version_string(), prog_name="edgeprune")
def cli() -> None:
    """Prune and quantize a Llama-family model into a GGUF that fits a device, and prove that it does.

    \b
    Typical use:
      edgeprune profiles list
      edgeprune export ./SmolLM2-135M-Instruct --profile raspberry-pi-5-8gb --out out/pi5
      edgeprune validate out/pi5/SmolLM2-135M-Instruct-Q4_K_M.gguf --profile raspberry-pi-5-8gb
    """


def _register() -> None:
    from edgeprune.cli import build, export, plan, profiles, report, validate

    for command in (export.export, export.prune, validate.validate, plan.plan, build.init, build.build,
                    report.report, profiles.profiles):
        cli.add_command(command)


_register()


def main() -> None:
    install_signal_handlers()
    try:
        cli.main(standalone_mode=False)
    except EdgepruneError as exc:
        click.echo(f"edgeprune: error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        click.echo("edgeprune: interrupted; no partial output was kept", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line here, the traceback in a file
        log = write_crash_log()
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        click.echo(f"edgeprune: internal error ({type(exc).__name__}{': ' + detail if detail else ''}); the traceback "
                   f"is in {log}: please report it with that file", err=True)
        sys.exit(EXIT_INTERNAL_ERROR)


def write_crash_log() -> str:
    """The current exception's traceback in a new file under the temporary directory; returns its path."""
    fd, path = tempfile.mkstemp(prefix="edgeprune-crash-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as log:
        log.write(f"edgeprune {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path
