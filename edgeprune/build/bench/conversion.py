"""Conversion suite: is edgeprune's GGUF writer as faithful as llama.cpp's own converter, and what does an export cost?

Four measurements on SmolLM2-135M-Instruct: logits of our F16 GGUF in llama.cpp against transformers; token
ids of transformers' tokenizer against llama.cpp on our GGUFs (from the GGUF input and from a Hugging Face
directory); our GGUF of that directory against the one llama.cpp's convert_hf_to_gguf.py writes; and the time
and peak memory of a full `edgeprune export`.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from converters import ConversionInput, write_gguf

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.fetch import fetch_smollm2
from edgeprune.build.loading import LoadedModel, load_model, save_hf_directory
from edgeprune.core.texts import default_evaluation_text
from edgeprune.device.validation.quality import divergence_rows
from edgeprune.device.validation.results import MIB
from edgeprune.build.bench.llamacpp import compare_ggufs, llama_cpp_convert, llama_cpp_version
from edgeprune.build.bench.tables import SuiteResult, table

PARITY_TOKENS = 512
TOKENIZE_CHARS = 50_000
HARD_TEXT = (
    "Grüße, café naïve 東京 🦙 — ½ ≠ 0.5\r\n\tTabs\t\there,   runs   of    spaces\n\n\n"
    "x=12345 + 3.14159 - 2026-11-28 1,000,000\r\n<|im_start|>user\nHi there<|im_end|>\r\n"
)
EXPORT_PROFILE, EXPORT_QUANT, EXPORT_CHUNKS = "raspberry-pi-5-8gb", "Q4_K_M", 20
MAX_EXAMPLES = 4
DIGIT_NOTE = (
    "Why they can differ: SmolLM2 was trained with every number character split off on its own; llama.cpp's "
    "`smollm` pre-tokenizer does that (regex `\\p{N}` first), but transformers' tokenizer rebuilt from a GGUF, "
    "and the tokenizer.json it saves, keep only GPT-2's ByteLevel step. ASCII digits still agree because the "
    "vocabulary has no space+digit merge; a number character outside ASCII (`½`, Unicode category No) after a "
    "space is where transformers merges the space with its first UTF-8 byte instead."
)


def run(progress) -> SuiteResult:
    source = fetch_smollm2()
    evaluation = default_evaluation_text()
    texts = {f"evaluation text, first {TOKENIZE_CHARS:,} chars": evaluation.content[:TOKENIZE_CHARS],
             "hard string": HARD_TEXT}
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-conv-") as tmp:
        tmp = Path(tmp)
        loaded = load_model(source, progress=progress)
        from_gguf = _write(loaded, tmp / "ours-from-gguf.gguf", progress)
        hf_dir = save_hf_directory(loaded, tmp / "hf")
        start = time.perf_counter()
        reloaded = load_model(hf_dir, progress=progress)
        from_hf = _write(reloaded, tmp / "ours-from-hf.gguf", progress)
        ours_seconds = time.perf_counter() - start
        theirs, theirs_seconds = llama_cpp_convert(hf_dir, tmp / "llama-cpp-converter.gguf", progress)
        ggufs = {"edgeprune, from the GGUF": from_gguf, "edgeprune, from the HF directory": from_hf,
                 "llama.cpp convert_hf_to_gguf.py, from the HF directory": theirs}

        progress("parity: transformers and llama.cpp logits")
        ids = loaded.tokenizer(evaluation.content[:TOKENIZE_CHARS], add_special_tokens=False)["input_ids"]
        ids = ids[:PARITY_TOKENS]
        with torch.no_grad():
            reference = loaded.model(torch.tensor([ids])).logits[0].numpy()
        parity = {name: _parity(reference, _llama_cpp_logits(path, ids)) for name, path in ggufs.items()}

        progress("tokenization: transformers against llama.cpp")
        tokenization = _tokenization(texts, {"GGUF input": (loaded, from_gguf), "HF directory": (reloaded, from_hf)},
                                     theirs)
        progress("comparing our GGUF with llama.cpp's converter's")
        comparison = compare_ggufs(from_hf, theirs)
        comparison["seconds"] = {"edgeprune": round(ours_seconds, 2), "llama.cpp": round(theirs_seconds, 2)}
        del loaded, reloaded  # free the torch models before the export runs
        export = _measure_export(source, tmp / "export", progress)

    data = {"evaluation_text": evaluation.name, "parity": parity, "tokenization": tokenization,
            "converter_comparison": comparison, "export": export}
    return SuiteResult(
        title="Conversion of SmolLM2-135M-Instruct: parity, tokenization, llama.cpp's converter, export cost",
        method=_METHOD.format(n=PARITY_TOKENS, text=evaluation.name, version=llama_cpp_version(),
                              profile=EXPORT_PROFILE, quant=EXPORT_QUANT, chunks=EXPORT_CHUNKS),
        data=data,
        sections=[_parity_section(parity), _tokenization_section(tokenization),
                  _comparison_section(comparison), _export_section(export)],
    )


_METHOD = (
    "Parity: the first {n} tokens of '{text}' through transformers (float32, the model dequantized from the "
    "Q4_1 GGUF) and through llama.cpp (llama-cpp-python, logits of every position) on each F16 GGUF; top-1 "
    "agreement and mean KL(transformers || llama.cpp) over all positions. Tokenization: transformers' tokenizer "
    "(add_special_tokens=False) against llama.cpp's (vocab only, special tokens parsed); agreement = tokens in "
    "difflib.SequenceMatcher's matching blocks (autojunk off) / the longer sequence's length. Converter: "
    "llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python {version} sdist, run with this Python on the "
    "same saved HF directory (--outtype f16); its time includes interpreter start-up and imports, ours "
    "(load_model + write_gguf, in process) does not. Export: `edgeprune export --profile {profile} --quant "
    "{quant} --eval-chunks {chunks}` as a child process; peak RSS is the largest resident set among it and its "
    "measuring children (wait4's ru_maxrss)."
)


def _write(loaded: LoadedModel, path: Path, progress) -> Path:
    return write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length), path, "F16",
                      progress)


# --- llama.cpp's converter --------------------------------------------------------------------------------


# --- parity and tokenization -------------------------------------------------------------------------------


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(ids), n_threads=os.cpu_count(), logits_all=True, verbose=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits


def _parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Top-1 agreement and KL(reference || candidate) per position, with validation's float64 arithmetic."""
    rows = divergence_rows(reference, candidate, np.zeros(len(reference), dtype=int))
    return {"positions": len(reference), "top1_agreement": float(rows["same_top"].mean()),
            "kld_mean": float(rows["kld"].mean()), "kld_max": float(rows["kld"].max())}


def _token_agreement(a: list[int], b: list[int]) -> float:
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / max(len(a), len(b), 1)


def _differences(hf: list[int], cpp: list[int], loaded: LoadedModel, limit: int) -> list[dict]:
    """The first spans where the two tokenizations part: the text, and each side's ids and GGUF pieces."""
    matcher = difflib.SequenceMatcher(None, hf, cpp, autojunk=False)
    spans = [op for op in matcher.get_opcodes() if op[0] != "equal"][:limit]
    pieces = loaded.vocab.tokens
    return [{
        "text": loaded.tokenizer.decode(hf[i1:i2] or cpp[j1:j2]),
        "transformers": {"ids": hf[i1:i2], "pieces": [pieces[t] for t in hf[i1:i2]]},
        "llama.cpp": {"ids": cpp[j1:j2], "pieces": [pieces[t] for t in cpp[j1:j2]]},
    } for _, i1, i2, j1, j2 in spans]


def _tokenization(texts: dict[str, str], paths: dict[str, tuple[LoadedModel, Path]], theirs: Path) -> dict:
    from llama_cpp import Llama

    ggufs = [path for _, path in paths.values()] + [theirs]
    vocabs = {path: Llama(str(path), vocab_only=True, verbose=False) for path in ggufs}

    def llama_tokens(path: Path, text: str) -> list[int]:
        return vocabs[path].tokenize(text.encode("utf-8"), add_bos=False, special=True)

    rows = []
    for path_name, (loaded, path) in paths.items():
        for text_name, text in texts.items():
            hf = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            cpp = llama_tokens(path, text)
            rows.append({"path": path_name, "text": text_name, "transformers_tokens": len(hf),
                         "llama_cpp_tokens": len(cpp), "agreement": _token_agreement(hf, cpp),
                         "identical": hf == cpp, "differences": _differences(hf, cpp, loaded, MAX_EXAMPLES)})
    hf_path = paths["HF directory"][1]
    same_as_converter = {name: llama_tokens(hf_path, text) == llama_tokens(theirs, text)
                         for name, text in texts.items()}
    for llm in vocabs.values():
        llm.close()
    return {"hard_string": HARD_TEXT, "rows": rows, "hf_path_identical_to_llama_cpp_converter": same_as_converter}


# --- the export command ------------------------------------------------------------------------------------


def _measure_export(model: Path, out_dir: Path, progress) -> dict:
    """Run `edgeprune export` as a child; its output goes to our stderr, wait4 gives its tree's peak RSS."""
    cmd = [sys.executable, "-m", "edgeprune.cli", "export", str(model), "--profile", EXPORT_PROFILE, "--quant",
           EXPORT_QUANT, "--out", str(out_dir), "--eval-chunks", str(EXPORT_CHUNKS)]
    progress("export: " + " ".join(cmd[1:]))
    start = time.perf_counter()
    pid = os.posix_spawn(sys.executable, cmd, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, 2, 1)])
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: a budget of the profile was missed on this machine, the report is complete
        raise EdgepruneError(f"edgeprune export failed with exit status {code}; its messages are above")
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # Linux reports KiB
    validation = report["validation"]
    return {
        "command": " ".join(["edgeprune", *cmd[3:]]), "exit_status": code, "seconds": round(seconds, 1),
        "peak_rss_bytes": peak, "stage_seconds": report["export"]["seconds"],
        "ppl": validation["perplexity"]["ppl"], "kld_mean": validation["divergence"]["kld_mean"],
        "decode_tps": validation["speed"]["decode_tps"], "passed": validation["passed"],
    }


# --- Markdown ----------------------------------------------------------------------------------------------


def _parity_section(parity: dict) -> str:
    rows = [[name, f"{100 * p['top1_agreement']:.2f}%", f"{p['kld_mean']:.2e}", f"{p['kld_max']:.2e}"]
            for name, p in parity.items()]
    return "## Logit parity with transformers (F16 GGUF in llama.cpp)\n\n" + table(
        ["GGUF", "top-1 agreement", "mean KLD", "max KLD"], rows)


def _tokenization_section(result: dict) -> str:
    rows = [[r["path"], r["text"], f"{r['transformers_tokens']:,} / {r['llama_cpp_tokens']:,}",
             f"{100 * r['agreement']:.3f}%", "yes" if r["identical"] else "no"] for r in result["rows"]]
    same = ", ".join(f"{name}: {'identical' if equal else 'DIFFERENT'}"
                     for name, equal in result["hf_path_identical_to_llama_cpp_converter"].items())
    examples = [f"- {r['path']}, {r['text']}: {d['text']!r}: transformers {d['transformers']['ids']} "
                f"{d['transformers']['pieces']}, llama.cpp {d['llama.cpp']['ids']} {d['llama.cpp']['pieces']}"
                for r in result["rows"] for d in r["differences"]][:MAX_EXAMPLES]
    parts = [
        "## Tokenization: transformers against llama.cpp on our GGUFs",
        table(["path", "text", "tokens (transformers / llama.cpp)", "agreement", "identical"], rows),
        f"Hard string: `{result['hard_string']!r}`.",
        f"llama.cpp on our HF-path GGUF against llama.cpp on its own converter's GGUF: {same}.",
        "Where transformers and llama.cpp differ (pieces as the GGUF stores them, Ġ = space):\n\n"
        + ("\n".join(examples) if examples else "- nowhere: every token id agrees"),
        DIGIT_NOTE,
    ]
    return "\n\n".join(parts)


def _comparison_section(c: dict) -> str:
    def listed(items) -> str:
        return ", ".join(f"`{k}`" for k in items) or "none"

    def valued(items: dict) -> str:
        return ", ".join(f"`{k}` = {v}" for k, v in items.items()) or "none"

    rows = [
        ["tensors (ours / theirs)", f"{c['tensors'][0]} / {c['tensors'][1]}"],
        ["names only in one file", listed(c["tensors_only_ours"] + c["tensors_only_theirs"])],
        ["shape differences", listed(c["shape_differences"])],
        ["type differences", listed(c["type_differences"])],
        ["byte-identical tensor data", f"{c['byte_identical_tensors']} of {min(c['tensors'])}"
                                       + (f" (differ: {listed(c['data_differences'][:5])})" if c["data_differences"] else "")],
        ["metadata keys only ours", valued(c["keys_only_ours"])],
        ["metadata keys only theirs", valued(c["keys_only_theirs"])],
        ["metadata keys with different values (ours vs theirs)",
         valued({k: " vs ".join(d.get("values") or d["at_first_difference"]) for k, d in c["keys_differing"].items()})],
        ["file MiB (ours / theirs)", f"{c['file_bytes'][0] / MIB:.2f} / {c['file_bytes'][1] / MIB:.2f}"],
        ["conversion seconds (ours / theirs)", f"{c['seconds']['edgeprune']:.1f} / {c['seconds']['llama.cpp']:.1f}"],
    ]
    return "## Our GGUF against llama.cpp's convert_hf_to_gguf.py (same HF directory, F16)\n\n" + table(
        ["", "result"], rows)


def _export_section(e: dict) -> str:
    rows = [[stage, f"{seconds:.1f}"] for stage, seconds in e["stage_seconds"].items()]
    rows.append(["**total (wall, with start-up)**", f"{e['seconds']:.1f}"])
    verdict = {True: "PASS", False: "FAIL", None: "no budgets"}[e["passed"]]
    return (
        f"## Export cost\n\n`{e['command']}`: peak RSS {e['peak_rss_bytes'] / MIB:.0f} MiB, exit status "
        f"{e['exit_status']} (profile verdict on this machine: {verdict}; PPL {e['ppl']:.3f}, mean KLD "
        f"{e['kld_mean']:.5f}, decode {e['decode_tps']:.1f} tok/s).\n\n" + table(["stage", "seconds"], rows)
    )
