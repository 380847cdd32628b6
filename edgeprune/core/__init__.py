"""Shared small pieces that import neither side: errors, atomic writes, texts, fetch, shapes, families."""
