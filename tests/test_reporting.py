"""Report pages from report.json documents built out of the real dataclasses (no llama.cpp run), and one look at
the page in a real headless browser (Debian's chromium), whose screenshot is kept in test-artifacts/."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.reporting.compare import merge_reports
from edgeprune.device.reporting.document import load_report
from edgeprune.device.reporting.page import write_report_pages
from edgeprune.build import plots
from edgeprune.build.plots import FAIL_COLOR, PASS_COLOR
from edgeprune.core.shapes import LayerShape
from edgeprune.device.validation.results import (MIB, BudgetCheck, DivergenceResult, MemoryResult, PerplexityResult,
                                                 Predicted, SpeedResult, ValidationReport)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
WINDOW = (1280, 2500)  # tall enough for the whole single-run page: the kept screenshot shows every plot
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def validation(gguf: str = "out/SmolLM2-135M-Q4_K_M.gguf", *, file_mib: float = 100.5, ppl: float = 21.734,
               kld: float | None = 0.04321, decode: float = 41.2, memory_limit: float = 600.0) -> ValidationReport:
    """A plausible validation of SmolLM2-135M at Q4_K_M: memory and file size pass, decode speed fails."""
    file_bytes = int(file_mib * MIB)
    memory = MemoryResult(file_bytes=file_bytes, n_params=134_515_008, kv_cache_bytes=24 * MIB,
                          peak_rss_bytes=260 * MIB, context_length=2048, compute_buffer_bytes=66 * MIB,
                          total_bytes=file_bytes + 90 * MIB,
                          basis={"file": "measured (file size)", "kv_cache": "measured (llama.cpp's KV buffer sizes)",
                                 "compute_buffer": "measured (llama.cpp's compute buffer sizes)",
                                 "peak_rss": "measured (VmHWM of the measuring process)"})
    divergence = None if kld is None else DivergenceResult(
        kld_mean=kld, kld_median=kld / 2, kld_p90=kld * 2, kld_p99=kld * 6, kld_max=kld * 40, top1_agreement=0.9137,
        delta_p_mean=-0.004, delta_p_rms=0.03, n_tokens=1020, reference_gguf="out/reference-F16.gguf",
        reference_ppl=20.118)
    checks = [
        BudgetCheck("memory", memory_limit, memory.total_bytes / MIB, "MiB", memory.total_bytes / MIB <= memory_limit),
        BudgetCheck("decode_tps", 60.0, decode, "tok/s", decode >= 60.0, "predicted for Raspberry Pi 5"),
        BudgetCheck("ttft", 2.0, 0.734, "s", True, "predicted for Raspberry Pi 5"),
        BudgetCheck("file_size", 400.0, file_mib, "MiB", file_mib <= 400.0),
    ]
    return ValidationReport(
        gguf=gguf, eval_text="python-reference-odd", perplexity=PerplexityResult(ppl, 3.079, 4, 512, 1020),
        divergence=divergence, speed=SpeedResult(512.3, 88.6, 0.25, 128, 64, 5, 2, 128), memory=memory,
        checks=checks, passed=all(c.passed for c in checks),
        predicted_device=Predicted("Raspberry Pi 5", decode, 95.4, 0.734, memory.total_bytes - 3 * MIB, file_bytes),
        predicted_host=Predicted("host", 80.1, 530.0, 0.24, memory.total_bytes + 5 * MIB, file_bytes),
    )


def document(report: ValidationReport, *, device: dict | None = None, pruned: bool = True) -> dict:
    """The report.json shape: export (with pruning widths) + validation, schema_version and device optional."""
    layers = [LayerShape(9 - (i % 3), 3, 1536 - 128 * (i % 4)) for i in range(30)]
    doc = {
        "schema_version": 1,
        "export": {"model": "models/SmolLM2-135M", "profile": "raspberry-pi-5-8gb", "quant": "Q4_K_M",
                   "gguf": Path(report.gguf).name, "plan": None, "imatrix": {"used": True}, "fallbacks": [],
                   "pruning": {"architecture": "deci", "removed_params": 21_000_000, "decoder_params_before": 106_000_000,
                               "layers": [dataclasses.asdict(layer) for layer in layers], "details": {}}
                   if pruned else None, "seconds": {}},
        "validation": report.to_dict(),
    }
    if device is not None:
        doc["device"] = device
    return doc


def pi(hostname: str) -> dict:
    return {"cpu": "Cortex-A76", "cores": 4, "ram_bytes": 8 * 1024**3, "os": "Linux 6.6", "threads": 4,
            "hostname": hostname, "llama_cpp": {"build": "b5000", "system_info": "NEON = 1"}}


def table_rows(page: str) -> list[list[str]]:
    """The cells of every row in the page, tags stripped, in order."""
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)]


def markdown_rows(md: str) -> list[list[str]]:
    return [[cell.strip().replace("\\|", "|") for cell in line.strip().strip("|").split(" | ")]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| ---")]


def test_single_run_page_is_self_contained_and_shows_the_numbers(tmp_path):
    doc = document(validation(), device=pi("pi5-a"))
    written = write_report_pages(doc, tmp_path, plots=plots)
    page = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert set(written) == {tmp_path / "report.html", tmp_path / "report.md", tmp_path / "report-margins.png",
                            tmp_path / "report-predicted.png", tmp_path / "report-layers.png"}
    assert not EXTERNAL.search(page), "the page must not load anything from the network"
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in images)
    for number in ("21.734", "0.04321", "91.37%", "100.5 MiB", "41.200 tok/s", "88.6 tok/s", "512.3 tok/s",
                   "Cortex-A76", "8.0 GiB", "-31.3%"):
        assert number in page, number
    rows = table_rows(page)
    assert ["decode_tps", "≥ 60 tok/s", "41.200 tok/s", "-31.3%", "predicted for Raspberry Pi 5", "FAIL"] in rows
    assert ["memory", "≤ 600 MiB", "190.500 MiB", "+68.2%", "measured here", "PASS"] in rows
    assert ["verdict", "FAIL"] in rows
    assert any(r[0] == "memory" and "KV cache 24.0 MiB (measured" in r[1] and "compute 66.0 MiB (measured)" in r[1]
               for r in rows)
    assert '<td class="fail">FAIL</td>' in page and '<td class="pass">PASS</td>' in page
    assert markdown_rows(md) == rows, "the Markdown must hold the same tables as the page"
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == ["report-margins.png", "report-predicted.png",
                                                        "report-layers.png"]


def test_missing_sections_are_left_out(tmp_path):
    bare = dataclasses.replace(validation(kld=None), predicted_device=None, predicted_host=None, checks=[],
                               passed=None)
    doc = {"export": None, "validation": bare.to_dict()}  # a bundle validator's document, old shape
    write_report_pages(doc, tmp_path, stem="bare", plots=plots)
    page = (tmp_path / "bare.html").read_text()
    assert "<img" not in page and "KLD" not in page and "Budgets" not in page and "Device" not in page
    assert ["verdict", "no budgets"] in table_rows(page)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.html", "bare.md"]

    no_validation = document(validation(), pruned=False)
    no_validation["validation"] = None  # an export without a profile
    write_report_pages(no_validation, tmp_path / "export", plots=plots)
    assert ["validation", "none (exported without a profile)"] in table_rows((tmp_path / "export/report.html").read_text())


def test_merge_of_three_runs_is_one_page_with_a_column_each(tmp_path):
    runs = [document(validation("a/SmolLM2-135M-Q4_K_M.gguf"), device=pi(f"pi5-{name}")) for name in "abc"]
    runs[2] = document(validation("c/SmolLM2-135M-Q4_K_M.gguf", decode=70.0), device=pi("pi5-c"))
    written = merge_reports(runs, tmp_path / "compare.html", tmp_path / "compare.md", plots=plots)
    page = (tmp_path / "compare.html").read_text()
    rows = table_rows(page)
    assert rows[0] == ["", "pi5-a", "pi5-b", "pi5-c"]  # one file on three devices: the devices name the columns
    assert ["verdict", "FAIL", "FAIL", "PASS"] in rows
    assert ["decode", "88.6 tok/s", "88.6 tok/s", "88.6 tok/s"] in rows
    assert all(len(row) == 4 for row in rows)
    assert len(re.findall(r"<img ", page)) == 4  # quality against size + one margin plot per run
    assert not EXTERNAL.search(page)
    assert markdown_rows((tmp_path / "compare.md").read_text()) == rows
    assert tmp_path / "compare-quality.png" in written and tmp_path / "compare-margins-3.png" in written

    files = [document(validation(f"out/SmolLM2-{q}.gguf", file_mib=size, ppl=ppl))
             for q, size, ppl in (("Q8_0", 138.0, 20.3), ("Q4_K_M", 100.5, 21.7), ("Q3_K_M", 83.2, 24.9))]
    merge_reports(files, tmp_path / "files.html", plots=plots)
    assert table_rows((tmp_path / "files.html").read_text())[0] == ["", "SmolLM2-Q8_0.gguf", "SmolLM2-Q4_K_M.gguf",
                                                                   "SmolLM2-Q3_K_M.gguf"]
    assert not (tmp_path / "files.md").exists()


def test_load_report_accepts_directories_and_bare_validations_and_names_bad_files(tmp_path):
    doc = document(validation())
    (tmp_path / "report.json").write_text(json.dumps(doc))
    assert load_report(tmp_path) == doc
    (tmp_path / "bare.json").write_text(json.dumps(validation().to_dict()))
    assert load_report(tmp_path / "bare.json") == {"validation": validation().to_dict()}
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "truncated.json").write_text(json.dumps({"validation": {"gguf": "x.gguf"}}))
    for name in ("missing", "broken.json", "other.json", "truncated.json"):
        with pytest.raises(EdgepruneError) as error:
            load_report(tmp_path / name)
        assert name in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(EdgepruneError, match="no reports"):
        merge_reports([], tmp_path / "empty.html", plots=plots)


def test_importing_the_module_does_not_import_matplotlib():
    code = ("import sys, edgeprune.device.reporting.page, edgeprune.device.reporting.compare, edgeprune.build.plots; "
            "print('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_without_matplotlib_the_page_has_its_tables_and_says_plots_need_it(tmp_path, monkeypatch):
    """A device install has no matplotlib: the pages are written all the same, with every table, no image and a
    note naming the package to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    doc = document(validation(), device=pi("pi5-a"))
    written = write_report_pages(doc, tmp_path, plots=plots)
    assert sorted(p.name for p in written) == ["report.html", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]
    page, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    rows = table_rows(page)
    assert ["decode_tps", "≥ 60 tok/s", "41.200 tok/s", "-31.3%", "predicted for Raspberry Pi 5", "FAIL"] in rows
    assert ["verdict", "FAIL"] in rows and any(r[0] == "decode tok/s" for r in rows)  # the prediction table
    assert "<img" not in page and "![" not in md
    for text in (page, md):
        assert text.count("plots need matplotlib (`pip install matplotlib`)") == 1
    assert markdown_rows(md) == rows

    runs = [document(validation(), device=pi(f"pi5-{name}")) for name in "ab"]
    written = merge_reports(runs, tmp_path / "compare.html", tmp_path / "compare.md", plots=plots)
    assert sorted(p.name for p in written) == ["compare.html", "compare.md"]
    page = (tmp_path / "compare.html").read_text()
    assert table_rows(page)[0] == ["", "pi5-a", "pi5-b"] and "<img" not in page
    assert "plots need matplotlib (`pip install matplotlib`)" in page


PROBE = """<script>window.addEventListener("load", () => {
  const widths = [...document.images].map(img => img.naturalWidth);
  document.body.setAttribute("data-image-widths", widths.join(","));
});</script></body>"""


def chromium(*args: str, cwd: Path) -> str:
    command = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={cwd / 'profile'}",
               "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=cwd, check=True).stdout


def colour_pixels(image: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).sum())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_renders_its_images_in_a_real_browser(tmp_path):
    """chromium opens the page from disk with no network: every image must decode (naturalWidth > 0) and the
    screenshot must show the plots' green and red margin bars, which no other part of the page paints."""
    import matplotlib.image

    write_report_pages(document(validation(), device=pi("pi5-a")), tmp_path, plots=plots)
    page = tmp_path / "report.html"
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE, 1))
    dom = chromium("--dump-dom", probe.as_uri(), cwd=tmp_path)
    widths = re.search(r'data-image-widths="([^"]*)"', dom)
    assert widths, "the page's load handler did not run"
    assert [int(w) > 0 for w in widths.group(1).split(",")] == [True] * 3, widths.group(1)

    screenshot = tmp_path / "screenshot.png"
    chromium(f"--screenshot={screenshot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", page.as_uri(), cwd=tmp_path)
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / "report-screenshot.png"
    shutil.copyfile(screenshot, kept)
    print(f"screenshot: {kept}")
    image = matplotlib.image.imread(kept)
    assert image.shape[:2] == WINDOW[::-1]
    assert image[..., :3].std() > 0.05, "the screenshot is blank"
    assert colour_pixels(image, PASS_COLOR) > 2000 and colour_pixels(image, FAIL_COLOR) > 2000, \
        "the margin plot's bars are not in the screenshot"


def test_a_real_exports_page_shows_its_own_report_json(tiny_bpe_llama, tmp_path):
    """A tiny model exported through the real CLI (real llama.cpp validation): the page written beside report.json
    shows that document's own numbers, with every budget's measured value, basis and result, and the Markdown holds
    the same tables. The tests above render documents made here; this one renders what an export really writes."""
    from conftest import run_export

    from edgeprune.device.profile_writing import profile_to_toml
    from edgeprune.device.profiles import load_profile

    laptop = load_profile("x86-laptop-16gb")
    profile = tmp_path / "laptop-512.toml"
    profile.write_text(profile_to_toml(dataclasses.replace(laptop, budgets=dataclasses.replace(
        laptop.budgets, context_length=512))))
    out = tmp_path / "out"
    result = run_export(tiny_bpe_llama, out, "--quant", "Q8_0", "--eval-chunks", "2", "--eval-fixed", "--eval-ctx",
                        "128", "--threads", "1", profile=str(profile))
    assert result.returncode == 0, result.stderr[-3000:]
    v = json.loads((out / "report.json").read_text())["validation"]
    page = (out / "report.html").read_text()
    rows = table_rows(page)
    assert ["GGUF", v["gguf"]] in rows and ["quant", "Q8_0"] in rows and ["verdict", "PASS"] in rows
    ppl, d, speed = v["perplexity"], v["divergence"], v["speed"]
    assert ["PPL", f"{ppl['ppl']:.3f} ± {ppl['ppl'] * ppl['nll_stderr']:.3f} ({v['eval_text']}: 2 chunks of 128 "
                   "tokens, a fixed count)"] in rows
    assert ["KLD", f"mean {d['kld_mean']:.5f} ± {d['kld_stderr']:.5f}, p99 {d['kld_p99']:.5f} (reference PPL "
                   f"{d['reference_ppl']:.3f})"] in rows
    assert ["decode", f"{speed['decode_tps']:.1f} tok/s (tg{speed['n_gen']}, 1 thread(s))"] in rows
    assert {c["name"] for c in v["checks"]} == {"memory", "decode_tps", "ttft"}
    for c in v["checks"]:
        assert [c["name"], f"{c['measured']:.3f} {c['unit']}", c["basis"], "PASS" if c["passed"] else "FAIL"] == \
            [r[i] for r in rows if r[0] == c["name"] and len(r) == 6 for i in (0, 2, 4, 5)], c
    assert markdown_rows((out / "report.md").read_text()) == rows
    # the validation's two plots and the planner's frontier, all inline
    assert not EXTERNAL.search(page) and len(re.findall(r'<img src="data:image/png;base64,', page)) == 3
    assert "Frontier (estimated by the planner)" in page
