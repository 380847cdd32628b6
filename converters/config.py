"""config.json, field by field: each family's table (llama.py, qwen2.py) says what becomes of each field that
transformers' config class reads, so that none is read with a default of ours or silently left out."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from edgeprune.core.errors import EdgepruneError

MAPPED = "mapped"  # written into the GGUF: a shape key or tensor, the context length, the rope or norm keys, a token id
INERT = "inert"  # changes nothing transformers computes at inference


@dataclass(frozen=True)
class Only:
    """A field checked against the values llama.cpp's graph runs (none: refused whatever its value); `each`
    checks every item of a list."""

    values: tuple = ()
    why: str = ""
    each: bool = False

    def allows(self, value) -> bool:
        return all(item in self.values for item in (value if self.each and isinstance(value, list) else [value]))


def check_config_fields(config: dict, fields: dict, known: Iterable[str], where: str) -> None:
    """Refuse, by name, a config.json field whose value llama.cpp would not run as transformers does, and a field
    transformers' config class reads (`known`) that the family's table does not classify (a newer transformers)."""
    known = set(known)
    for name, value in config.items():
        handling = fields.get(name)
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        if isinstance(handling, Only) and value is not None and not handling.allows(value):
            supported = f"supported: {', '.join(map(repr, handling.values))}" if handling.values else "not supported"
            raise EdgepruneError(f"{where} sets {name} = {shown}: {supported} ({handling.why})")
        if handling is None and name in known:
            raise EdgepruneError(f"{where} sets {name} = {shown}, a setting edgeprune cannot say llama.cpp runs as "
                                 f"transformers does: not supported")


@lru_cache(maxsize=None)
def config_defaults(model_type: str) -> dict:
    """Each field transformers' config class for `model_type` reads, with the value transformers runs when
    config.json leaves it out (max_position_embeddings: 2048 for Llama, 131072 for Mistral, 32768 for Qwen2)."""
    from transformers import CONFIG_MAPPING  # the build side: transformers is installed

    config_class = CONFIG_MAPPING[model_type]
    instance = config_class()
    parameters = inspect.signature(config_class.__init__).parameters.items()
    return {name: getattr(instance, name, None) for name, p in parameters
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
