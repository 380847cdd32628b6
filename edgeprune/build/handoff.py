"""Runtime hand-off for a built GGUF: an Ollama Modelfile, the server command lines the profile implies, and a
short README that says what was built and how to run it.

The chat template is translated for Ollama only for the families whose template is known (ChatML as SmolLM2,
Qwen2 and Qwen3 use, Llama-2's [INST], Llama-3's header tokens, Gemma's turns); any other is left to Ollama,
which reads the GGUF's own `tokenizer.chat_template`, and the Modelfile says so.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

# llama.cpp's ggml_type ids, which llama-cpp-python's server takes for --type_k/--type_v
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q8_0": 8}

_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
_LLAMA2 = """{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}[INST] {{ if and $.System (eq $i 0) }}<<SYS>>
{{ $.System }}
<</SYS>>

{{ end }}{{ $m.Content }} [/INST]{{- else }} {{ $m.Content }}</s>{{- end }}{{- end }}"""
# Gemma has no system role: a system prompt opens the first user turn; the assistant's role is "model".
_GEMMA = """{{- range $i, $m := .Messages }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}user{{ end }}
{{ if and $.System (eq $i 0) }}{{ $.System }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""


@dataclass(frozen=True)
class ChatFamily:
    name: str
    template: str
    stops: tuple[str, ...]


FAMILIES = (  # the marker each family's Jinja template contains, in the order they are tried
    ("<|start_header_id|>", ChatFamily("llama3", _LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))),
    ("<|im_start|>", ChatFamily("chatml", _CHATML, ("<|im_start|>", "<|im_end|>"))),
    ("[INST]", ChatFamily("llama2", _LLAMA2, ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"))),
    ("<start_of_turn>", ChatFamily("gemma", _GEMMA, ("<end_of_turn>", "<start_of_turn>"))),
)


def chat_family(chat_template: str | None) -> ChatFamily | None:
    """The known family of a Hugging Face chat template, or None."""
    for marker, family in FAMILIES:
        if chat_template and marker in chat_template:
            return family
    return None


@dataclass(frozen=True)
class ServeSettings:
    """What the profile's runtime implies for any llama.cpp server."""

    gguf: str  # file name, next to the Modelfile and README
    context_length: int
    threads: int
    kv_cache_type: str
    flash_attention: bool
    batch_size: int | None = None  # the profile's micro-batch, where it names one
    swa_full: bool | None = None  # for a model with sliding-window layers: the cache the profile was validated with

    @classmethod
    def of(cls, gguf: str, profile, sliding: bool = False) -> "ServeSettings":
        rt = profile.runtime
        return cls(gguf, profile.budgets.context_length, profile.device.threads, rt.kv_cache_type,
                   rt.flash_attention, rt.batch_size, rt.swa_full if sliding else None)

    def llama_server(self, port: int = 8080) -> list[str]:
        """llama-server gives sliding layers a window-sized cache unless told --swa-full."""
        batch = ["-ub", str(self.batch_size)] if self.batch_size else []
        return ["llama-server", "-m", self.gguf, "-c", str(self.context_length), "-t", str(self.threads), *batch,
                "-ctk", self.kv_cache_type, "-ctv", self.kv_cache_type, "-fa", "on" if self.flash_attention else "off",
                *(["--swa-full"] if self.swa_full else []), "--host", "127.0.0.1", "--port", str(port)]

    def llama_cpp_python_server(self, port: int = 8000) -> list[str]:
        """llama-cpp-python's server has no swa_full setting: it keeps llama.cpp's default, the full cache."""
        kv = str(GGML_TYPE_IDS[self.kv_cache_type])
        batch = ["--n_ubatch", str(self.batch_size)] if self.batch_size else []
        return ["python", "-m", "llama_cpp.server", "--model", self.gguf, "--n_ctx", str(self.context_length),
                "--n_threads", str(self.threads), *batch, "--type_k", kv, "--type_v", kv,
                "--flash_attn", str(self.flash_attention), "--host", "127.0.0.1", "--port", str(port)]


def modelfile(settings: ServeSettings, chat_template: str | None) -> str:
    family = chat_family(chat_template)
    lines = ["# Ollama Modelfile written by edgeprune: ollama create NAME -f Modelfile", f"FROM ./{settings.gguf}"]
    if family is not None:
        lines.append(f'TEMPLATE """{family.template}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in family.stops]
    else:
        lines.append("# the chat template is not a known family: Ollama reads the GGUF's tokenizer.chat_template")
    lines += [f"PARAMETER num_ctx {settings.context_length}", f"PARAMETER num_thread {settings.threads}"]
    return "\n".join(lines) + "\n"


def readme(target: str, entry: dict, settings: ServeSettings) -> str:
    """What was built for the target and how to run it, in a few lines."""
    verdict = {True: "PASS", False: "FAIL", None: "not judged"}[entry.get("passed")]
    return "\n".join([
        f"# {target}: {settings.gguf}",
        "",
        f"Built by edgeprune {entry['versions']['edgeprune']} from `{entry['model']}` for the profile "
        f"`{entry['profile']}`: {entry.get('plan') or entry['quant']}. Budgets verdict: **{verdict}** "
        "(see report.html; `bundle/` re-validates it on the device with `edgeprune validate bundle/`).",
        "",
        "Run it with the profile's runtime (context, threads, KV cache type, flash attention):",
        "",
        "```sh",
        shlex.join(settings.llama_server()) + "  # llama.cpp",
        shlex.join(settings.llama_cpp_python_server()) + "  # llama-cpp-python, OpenAI-compatible"
        + ("; its sliding-window cache is always full size" if settings.swa_full is False else ""),
        "ollama create " + target + " -f Modelfile && ollama run " + target,
        "```",
        "",
    ])


def write_handoff(directory: Path, target: str, entry: dict, profile, chat_template: str | None,
                  sliding: bool = False) -> ServeSettings:
    settings = ServeSettings.of(entry["gguf"], profile, sliding)
    (directory / "Modelfile").write_text(modelfile(settings, chat_template), encoding="utf-8")
    (directory / "README.md").write_text(readme(target, entry, settings), encoding="utf-8")
    return settings
