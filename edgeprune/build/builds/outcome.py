"""What a build returns: each target built, taken from the cache or failed, and where the manifest is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TargetOutcome:
    name: str
    directory: Path
    status: str  # "built", "cached" or "failed"
    entry: dict = field(default_factory=dict)
    error: str | None = None
    serve: list[str] | None = None  # the llama-cpp-python server command line


@dataclass
class BuildResult:
    targets: list[TargetOutcome]
    manifest: Path
    index: Path | None
    seconds: float

    @property
    def failed(self) -> list[TargetOutcome]:
        return [t for t in self.targets if t.status == "failed"]
