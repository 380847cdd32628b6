"""A copy of a GGUF with some metadata left out or changed, its tensors as they are (gguf-py's writer)."""

from __future__ import annotations

from pathlib import Path

import gguf


def copy_gguf(reader: gguf.GGUFReader, path: Path, *, drop_prefixes: tuple[str, ...] = (),
              changes: dict | None = None, every_nth_row: int = 1,
              replacements: dict[str, gguf.ReaderTensor] | None = None) -> Path:
    """A copy of a GGUF written by gguf-py, its tensors as they are, without the metadata keys starting with
    `drop_prefixes` and with the values in `changes` (key: value) replaced. With `every_nth_row` > 1 each matrix
    keeps only every n-th row: a sample that quantizes as the whole would, row for row, in a fraction of the time.
    A tensor named in `replacements` is taken from there instead (the same tensor in another file, of any type)."""
    changes, replacements = changes or {}, replacements or {}
    unknown = sorted(set(replacements) - {t.name for t in reader.tensors})
    if unknown:
        raise ValueError(f"cannot replace {', '.join(unknown)}: no such tensor in the GGUF being copied")
    writer = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", *drop_prefixes)) or field.name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, changes.get(field.name, field.contents()), field.types[0],
                             sub_type=sub_type)
    for tensor in (replacements.get(t.name, t) for t in reader.tensors):
        data = tensor.data[::every_nth_row] if len(tensor.shape) == 2 else tensor.data
        writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
