"""Validation at the precision asked for: scoring stops once the standard errors of mean log-PPL and mean KLD are
within a share of their estimates, never before MIN_CHUNKS, and the numbers are those of a fixed count of as many
chunks; bad settings are refused in one line before any work. Tiny random Llama GGUFs through the real llama.cpp."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from converters import ConversionInput, write_gguf
from edgeprune.build.loading import load_model
from edgeprune.cli import cli
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.texts import default_evaluation_text
from edgeprune.device.validation.quality import (MIN_CHUNKS, _precise_enough, check_evaluation_options,
                                                 measure_perplexity, relative_stderr)
from edgeprune.device.validation.results import PerplexityResult, with_stderr

CTX = 64


def test_relative_stderr_is_the_standard_error_of_the_chunk_means_over_their_mean():
    values = np.array([2.0, 2.2, 1.8, 2.4, 1.6])
    assert relative_stderr(values) == pytest.approx(np.std(values, ddof=1) / math.sqrt(5) / 2.0)
    assert relative_stderr(np.array([2.0])) == math.inf  # one chunk tells nothing of its own spread
    assert relative_stderr(np.array([0.0, 0.0])) == math.inf  # no estimate to be a share of


def test_the_rule_waits_for_min_chunks_and_for_both_estimates():
    steady, noisy = [2.0] * MIN_CHUNKS, [0.01, 0.2, 0.01, 0.3] + [0.01] * (MIN_CHUNKS - 4)
    assert not _precise_enough(0.05, steady[:-1], [])  # too few chunks, however steady
    assert _precise_enough(0.05, steady, [])  # perplexity alone, precise
    assert _precise_enough(0.05, steady, [0.1] * MIN_CHUNKS)
    assert not _precise_enough(0.05, steady, noisy)  # a precise PPL does not settle a noisy KLD
    assert not _precise_enough(None, steady, [])  # a fixed count never stops early


@pytest.mark.parametrize(("chunks", "precision", "message"), [
    (20, 0.0, "--eval-precision 0 is not a share"),
    (20, 1.0, "--eval-precision 1 is not a share"),
    (20, -0.5, "--eval-precision -0.5 is not a share"),
    (MIN_CHUNKS - 1, 0.05, f"--eval-chunks {MIN_CHUNKS - 1} is below the {MIN_CHUNKS} chunks"),
])
def test_bad_settings_are_refused_in_one_line(chunks, precision, message):
    with pytest.raises(EdgepruneError) as refused:
        check_evaluation_options(512, chunks, precision)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_fixed_count_takes_any_budget():
    check_evaluation_options(512, 1, None)


@pytest.mark.parametrize(("args", "message"), [
    (["--eval-precision", "1.5"], "--eval-precision 1.5 is not a share"),
    (["--eval-chunks", "2"], "--eval-chunks 2 is below"),
    (["--eval-fixed", "--eval-precision", "0.1"], "--eval-fixed scores exactly --eval-chunks chunks"),
])
def test_the_cli_refuses_before_reading_the_file(tmp_path, args, message):
    """The file does not exist: the refusal comes before anything looks at it."""
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "absent.gguf"), *args])
    assert result.exit_code != 0
    assert message in str(result.exception or result.output)


@pytest.fixture(scope="module")
def tiny_pair(_tiny_bpe_llama_once, tmp_path_factory):
    """A tiny random model as F16 and as F32: a candidate and its reference, with a KL divergence above zero."""
    directory = tmp_path_factory.mktemp("precision")
    loaded = load_model(_tiny_bpe_llama_once)
    made = ConversionInput(loaded.model, loaded.vocab, "tiny", 256)
    return write_gguf(made, directory / "f16.gguf", "F16"), write_gguf(made, directory / "f32.gguf", "F32")


def _measure(pair, chunks: int, precision: float | None):
    candidate, reference = pair
    lines: list[str] = []
    result = measure_perplexity(candidate, default_evaluation_text(), reference_gguf=reference, n_ctx=CTX,
                                max_chunks=chunks, precision=precision, threads=1, progress=lines.append)
    return *result, lines


def test_a_loose_target_stops_at_min_chunks_with_a_fixed_count_s_numbers(tiny_pair):
    ppl, kld, lines = _measure(tiny_pair, 12, 0.9)
    fixed_ppl, fixed_kld, _ = _measure(tiny_pair, MIN_CHUNKS, None)
    assert ppl.n_chunks == MIN_CHUNKS and ppl.precision_target == 0.9
    assert any(f"after {MIN_CHUNKS} chunks of 12" in line for line in lines)
    assert ppl.ppl == pytest.approx(fixed_ppl.ppl, rel=1e-9) and kld.kld_mean == pytest.approx(fixed_kld.kld_mean)
    assert ppl.nll_stderr == pytest.approx(fixed_ppl.nll_stderr) and kld.kld_stderr > 0
    assert fixed_ppl.precision_target is None


def test_an_unreachable_target_spends_the_budget(tiny_pair):
    ppl, kld, _ = _measure(tiny_pair, MIN_CHUNKS + 2, 1e-9)
    assert ppl.n_chunks == MIN_CHUNKS + 2 and kld.n_tokens == (MIN_CHUNKS + 2) * (CTX - 1 - CTX // 2)


def test_reports_state_the_interval_and_what_decided_the_count():
    ppl = PerplexityResult(ppl=10.0, nll_mean=math.log(10), n_chunks=6, n_ctx=512, n_tokens_scored=1530,
                           nll_stderr=0.02, precision_target=0.05)
    assert ppl.ppl_stderr == pytest.approx(0.2)
    assert with_stderr(ppl.ppl, ppl.ppl_stderr, 3) == "10.000 ± 0.200"
    assert "6 chunks of 512 tokens, until standard errors were within 5%" in ppl.chunks_text()
