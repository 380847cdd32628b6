"""The tokenizer as GGUF stores it, read from a Hugging Face directory or carried over from a source GGUF.

A `Vocab` is plain data, so the writer does not care where it came from. From a GGUF input we copy the
tokenizer keys verbatim (nothing can be lost); from a Hugging Face directory we build them the way
llama.cpp's convert_hf_to_gguf.py does, with gguf-py's helpers for merges, special ids and the template.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from edgeprune.core.errors import EdgepruneError

# Keys of a GGUF's tokenizer section that are carried over verbatim from a GGUF input.
_GGUF_TOKENIZER_PREFIX = "tokenizer."

# The Split regexes of byte-level BPE tokenizer.json files, as llama.cpp's src/llama-vocab.cpp quotes them
# ("original regex from tokenizer.json"). With the model's ignore_merges flag (which llama.cpp sets per
# pre-tokenizer, not from the file), each names the tokenizer.ggml.pre that reproduces it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                 r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {  # (regex, ignore_merges) → tokenizer.ggml.pre
    (_LLAMA3_SPLIT, True): "llama-bpe",
    (_LLAMA3_SPLIT, False): "smaug-bpe",  # Llama-3's regex, merges always applied (as llama.cpp's converter finds)
    (_QWEN2_SPLIT, False): "qwen2",
    (_TEKKEN_SPLIT, True): "tekken",
}
# gguf-py's SpecialVocab names special tokens by kind; these are their GGUF keys.
_K = gguf.Keys.Tokenizer
SPECIAL_TOKEN_KEYS = {
    "bos": _K.BOS_ID, "eos": _K.EOS_ID, "unk": _K.UNK_ID, "sep": _K.SEP_ID, "pad": _K.PAD_ID,
    "mask": _K.MASK_ID, "eot": _K.EOT_ID, "eom": _K.EOM_ID,
}


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # tokenizer.ggml.pre: selects llama.cpp's pre-tokenizer regexes
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos", "eos", "unk", "pad", ...
    add_special: dict[str, bool] = field(default_factory=dict)  # "bos": True → tokenizer.ggml.add_bos_token
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            writer.add_uint32(SPECIAL_TOKEN_KEYS[kind], token_id)
        for kind, add in self.add_special.items():
            writer.add_bool(_add_token_key(kind), add)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _add_token_key(kind: str) -> str:
    return f"{_GGUF_TOKENIZER_PREFIX}ggml.add_{kind}_token"


def vocab_from_gguf(reader: gguf.GGUFReader) -> Vocab:
    """Carry a source GGUF's tokenizer over unchanged."""

    def value(key: str):
        f = reader.fields.get(key if key.startswith(_GGUF_TOKENIZER_PREFIX) else _GGUF_TOKENIZER_PREFIX + key)
        return None if f is None else f.contents()

    tokens = value("ggml.tokens")
    if tokens is None:
        raise EdgepruneError("the GGUF has no tokenizer (tokenizer.ggml.tokens): use a GGUF with its vocabulary")
    special = {}
    for kind, key in SPECIAL_TOKEN_KEYS.items():
        token_id = value(key)
        if token_id is not None:
            special[kind] = int(token_id)
    return Vocab(
        model=value("ggml.model"),
        pre=value("ggml.pre"),
        tokens=list(tokens),
        token_types=[int(t) for t in value("ggml.token_type")],
        scores=[float(s) for s in value("ggml.scores")] if value("ggml.scores") is not None else None,
        merges=list(value("ggml.merges") or []),
        special_ids=special,
        add_special={kind: bool(value(_add_token_key(kind))) for kind in SPECIAL_TOKEN_KEYS
                     if value(_add_token_key(kind)) is not None},
        add_space_prefix=value("ggml.add_space_prefix"),
        chat_template=value("chat_template"),
    )


def vocab_from_hf_dir(directory: Path, vocab_size: int) -> Vocab:
    """Build the GGUF tokenizer from tokenizer.model (SentencePiece) or tokenizer.json (SentencePiece-style BPE
    with byte fallback, or byte-level BPE), in the order llama.cpp's converter tries them."""
    if (directory / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(directory, vocab_size)
    elif (directory / "tokenizer.json").is_file():
        spec = _read_tokenizer_json(directory)
        sentencepiece = _is_sentencepiece_bpe(spec)
        _check_normalizer_and_decoder(spec, sentencepiece, directory / "tokenizer.json")
        vocab = (_sentencepiece_bpe_vocab(directory, spec, vocab_size) if sentencepiece
                 else _bpe_vocab(spec, directory, vocab_size))
        if sentencepiece and spec.get("normalizer") == _SPACES:
            vocab.add_space_prefix = False  # spaces become U+2581 with no prefix (Gemma)
    else:
        raise EdgepruneError(
            f"no tokenizer in {directory}: expected tokenizer.json or tokenizer.model next to config.json"
        )
    special = gguf.SpecialVocab(directory, load_merges=vocab.model == "gpt2", n_vocab=vocab_size)
    vocab.merges = [m if isinstance(m, str) else " ".join(m) for m in special.merges]
    vocab.special_ids = {k: v for k, v in special.special_token_ids.items() if k in SPECIAL_TOKEN_KEYS}
    vocab.add_special = dict(special.add_special_token)  # what llama.cpp's converter sets, and only that
    template = special.chat_template
    vocab.chat_template = template if isinstance(template, str) else None
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        settings = json.loads(config_path.read_text(encoding="utf-8"))
        _check_tokenizer_config(settings, vocab.model, config_path)
        if "add_prefix_space" in settings:  # as llama.cpp's converter writes it
            vocab.add_space_prefix = settings["add_prefix_space"]
    return vocab


def _check_tokenizer_config(settings: dict, model: str, path: Path) -> None:
    """tokenizer_config.json's settings that change how transformers splits text (it rebuilds a SentencePiece
    tokenizer's space handling from them, whatever tokenizer.json says).

    add_prefix_space: llama.cpp's SentencePiece tokenizer reads it (tokenizer.ggml.add_space_prefix, written as
    llama.cpp's converter writes it); its byte-level BPE tokenizer never prepends a space, so true is refused there.
    legacy: transformers' `false` (its default) prefixes a space to the first piece of text only, llama.cpp
    (like `true`) also to text that follows a special token written in the text. Text without special tokens in
    it (the built-in texts; llama.cpp scores with special tokens unparsed) splits the same either way, so both
    are accepted (tests/test_config_fields.py); llama.cpp has no key for the difference.
    """
    if model == "gpt2" and settings.get("add_prefix_space"):
        raise EdgepruneError(f"{path} sets add_prefix_space = true: supported for a byte-level BPE tokenizer: "
                             "false (llama.cpp's BPE tokenizer never prepends a space)")


def _read_tokenizer_json(directory: Path) -> dict:
    path = directory / "tokenizer.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgepruneError(f"{path} is not valid JSON ({exc}): the file is truncated or damaged") from exc


def _bpe_vocab(spec: dict, directory: Path, vocab_size: int) -> Vocab:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise EdgepruneError(
            f"{directory / 'tokenizer.json'} holds a {model.get('type')} tokenizer: supported are BPE and SentencePiece"
        )
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= vocab_size:
        raise EdgepruneError(
            f"tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}: tokenizer and weights disagree"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    pre = _bpe_pre_tokenizer(spec.get("pre_tokenizer"), model)
    return Vocab(model="gpt2", pre=pre, tokens=tokens, token_types=types)


def _bpe_pre_tokenizer(pre: dict | None, model: dict) -> str:
    """Name llama.cpp's pre-tokenizer that reproduces this tokenizer.json's pre-tokenization.

    A Split by one of the regexes llama.cpp carries (SPLIT_PRE_TOKENIZERS) followed by a ByteLevel step is that
    pre-tokenizer. A plain ByteLevel step with its regex splits by GPT-2's regex, llama.cpp's `gpt-2`. When no
    token of the vocabulary joins a digit to anything else, as in a model trained with digits split one by one
    (SmolLM; transformers drops the Digits step when it rebuilds the tokenizer from a GGUF), BPE cannot merge a
    digit either way, so `smollm` (GPT-2's regex after splitting digits) gives the same tokens: llama.cpp's own
    converter, which recognises a tokenizer by its tokenization of a test text, names it so.
    """
    if pre is None:
        raise EdgepruneError("tokenizer.json has no pre_tokenizer: supported for a byte-level BPE tokenizer are a "
                             "ByteLevel step, alone or after a Digits or Split step (llama.cpp always splits words)")
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    for part in parts:
        if part.get("type") == "ByteLevel" and part.get("add_prefix_space"):
            raise EdgepruneError("tokenizer.json's ByteLevel pre-tokenizer sets add_prefix_space = true: supported: "
                                 "false (llama.cpp's BPE tokenizer never prepends a space)")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "smollm" if not any(_joins_a_digit(token) for token in model["vocab"]) else "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        found = SPLIT_PRE_TOKENIZERS.get((pattern, bool(model.get("ignore_merges"))))
        if found is None:
            raise EdgepruneError(f"unsupported BPE pre-tokenizer: a Split by the regex {pattern[:80]!r} with "
                                 f"ignore_merges {bool(model.get('ignore_merges'))} is none of llama.cpp's "
                                 f"{', '.join(SPLIT_PRE_TOKENIZERS.values())}")
        return found
    raise EdgepruneError(f"unsupported BPE pre-tokenizer {kinds}: edgeprune knows the byte-level pre-tokenizers "
                         f"gpt-2, smollm, {', '.join(SPLIT_PRE_TOKENIZERS.values())}")


_BYTE_OF_CHAR = {ch: byte for byte, ch in gguf.vocab.bytes_to_unicode().items()}


def _joins_a_digit(token: str) -> bool:
    """Whether a byte-level token holds a digit (any Unicode number) beside another character."""
    text = bytes(_BYTE_OF_CHAR.get(ch, 0) for ch in token).decode("utf-8", errors="replace")
    return len(text) > 1 and any(unicodedata.category(ch).startswith("N") for ch in text)


# Normalizers llama.cpp applies: none for byte-level BPE; for SentencePiece-style BPE, the Prepend + Replace pair
# that is its own space handling (a space prefix, spaces as U+2581), or the Replace alone: spaces as U+2581
# without a prefix, as Gemma's tokenizer.json has it (tokenizer.ggml.add_space_prefix false; its Split on ' '
# pre-tokenizer then finds no space left to split on).
_SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_SENTENCEPIECE_NORMALIZER = [{"type": "Prepend", "prepend": "\u2581"}, _SPACES]
# ... except NFC on byte-level BPE, kept as llama.cpp's converter keeps it for Qwen2, whose tokenizer.json carries
# it: text already in NFC form (as typed and as edgeprune's texts are) is left unchanged by it.
_BYTE_LEVEL_NORMALIZERS = ({"type": "NFC"},)
# Decoders that undo each tokenizer model's encoding as llama.cpp's detokenizer does.
_SENTENCEPIECE_DECODER_STEPS = ("Replace", "ByteFallback", "Fuse", "Strip", "Metaspace")


def _check_normalizer_and_decoder(spec: dict, sentencepiece: bool, path: Path) -> None:
    """Refuse, by name, a tokenizer.json normalizer llama.cpp does not apply (it would tokenize other text than
    transformers), and a decoder that does not match the tokenizer model."""
    if (spec.get("model") or {}).get("type") != "BPE":
        return  # refused by its model type (_bpe_vocab)
    normalizer = spec.get("normalizer")
    steps = (normalizer or {}).get("normalizers", [normalizer]) if (normalizer or {}).get("type") == "Sequence" \
        else [normalizer]
    if sentencepiece:
        allowed = normalizer is None or steps in (_SENTENCEPIECE_NORMALIZER, [_SPACES])
        supported = "none (with a Metaspace pre-tokenizer), or [Prepend('\u2581') +] Replace(' ', '\u2581')"
    else:
        allowed = normalizer is None or normalizer in _BYTE_LEVEL_NORMALIZERS
        supported = "none, or NFC (llama.cpp applies no normalizer to byte-level BPE)"
    if not allowed:
        kinds = [(s or {}).get("type") for s in steps]
        raise EdgepruneError(f"{path} has the normalizer {'+'.join(map(str, kinds))}: supported: {supported}")
    decoder = spec.get("decoder") or {}
    decoder_steps = [d.get("type") for d in decoder.get("decoders", [])] if decoder.get("type") == "Sequence" \
        else [decoder.get("type")]
    if sentencepiece and not set(decoder_steps) <= set(_SENTENCEPIECE_DECODER_STEPS):
        raise EdgepruneError(f"{path} has the decoder {'+'.join(map(str, decoder_steps))} for a SentencePiece-style "
                             f"BPE: supported: a Sequence of {', '.join(_SENTENCEPIECE_DECODER_STEPS)}")
    if not sentencepiece and decoder_steps != ["ByteLevel"]:
        raise EdgepruneError(f"{path} has the decoder {'+'.join(map(str, decoder_steps))} for a byte-level BPE: "
                             "supported: ByteLevel")


def _is_sentencepiece_bpe(spec: dict) -> bool:
    """A SentencePiece tokenizer as transformers saves it without tokenizer.model: BPE with byte fallback (a
    Metaspace pre-tokenizer, or a Prepend + Replace normalizer), decoded by a Sequence. The test is gguf-py's
    LlamaHfVocab's, which llama.cpp's converter uses for such a directory."""
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and \
        (spec.get("decoder") or {}).get("type") == "Sequence"


def _sentencepiece_bpe_vocab(directory: Path, spec: dict, vocab_size: int) -> Vocab:
    """Pieces and types as gguf-py's LlamaHfVocab reads them, scored by merge rank. llama.cpp's SentencePiece
    tokenizer merges the adjacent pair whose joined piece scores highest; LlamaHfVocab gives every piece -1000
    (as llama.cpp's converter writes it), which merges in another order than transformers' BPE does. Scoring
    each piece by minus the rank of the merge that makes it gives transformers' order: on Gemma 3's
    tokenizer.json, 20,000 characters of the Python reference tokenize alike (4,583 tokens), and not with -1000."""
    try:
        pieces = list(gguf.LlamaHfVocab(directory).all_tokens())
    except (OSError, ValueError, KeyError) as exc:
        raise EdgepruneError(f"cannot read {directory / 'tokenizer.json'}: {str(exc).splitlines()[0]}") from exc
    rank: dict[bytes, int] = {}
    for i, merge in enumerate(spec["model"].get("merges") or []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault((left + right).encode("utf-8"), i)
    scored = [(piece, -1.0 - rank[piece] if piece in rank else 0.0, kind) for piece, _, kind in pieces]
    return _scored_vocab(scored, vocab_size)


def _sentencepiece_vocab(directory: Path, vocab_size: int) -> Vocab:
    try:
        pieces = list(gguf.vocab.SentencePieceVocab(directory).all_tokens())
    except Exception as exc:  # sentencepiece raises bare RuntimeError on a damaged model file
        raise EdgepruneError(f"cannot read {directory / 'tokenizer.model'}: {str(exc).splitlines()[0]}") from exc
    return _scored_vocab(pieces, vocab_size)


def _scored_vocab(pieces: list[tuple[bytes, float, gguf.TokenType]], vocab_size: int) -> Vocab:
    """The `llama` (SentencePiece) tokenizer model: pieces with scores, padded to the model's vocab_size."""
    if len(pieces) > vocab_size:
        raise EdgepruneError(
            f"tokenizer has {len(pieces)} tokens but the model's vocab_size is {vocab_size}: tokenizer and weights disagree"
        )
    tokens = [p.decode("utf-8") for p, _, _ in pieces] + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)]
    scores = [float(s) for _, s, _ in pieces] + [-1000.0] * (vocab_size - len(pieces))
    types = [int(t) for _, _, t in pieces] + [int(gguf.TokenType.UNUSED)] * (vocab_size - len(pieces))
    return Vocab(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores)
