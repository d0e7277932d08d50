"""Writing a twin: a model rewritten from another (aligned, FFN-split) that keeps the source's
metadata (tokenizer, chat template, names), under its own architecture if it changes, with the
keys the rewrite changes replaced, and records the type each tensor's data had in the source."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from windq.files import atomic_output
from windq.keys import Keys
from windq.models.gguf_model import GGUFModel


def write_twin(
    source: GGUFModel,
    out: str | Path,
    tensors: Mapping[str, np.ndarray],
    *,
    changed: Mapping[str, tuple[object, gguf.GGUFValueType]],
    source_of: Mapping[str, str] | None = None,
    arrays: Mapping[str, list] | None = None,
    arch: str | None = None,
) -> Path:
    """Write `tensors` (F32) to `out` atomically. `changed` keys replace or join the source's;
    `arch` renames the architecture and its `{arch}.` keys; `source_of` names the source tensor a
    new tensor was cut from (the others are their own)."""
    arch = arch or source.architecture
    source_of = dict(source_of or {})
    source_types = [f"{n}={source.source_type(source_of.get(n, n))}" for n in tensors if source_of.get(n, n) in source.tensors]
    out = Path(out)
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        for field in source.reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            prefix = source.architecture + "."
            key = arch + "." + field.name[len(prefix) :] if field.name.startswith(prefix) else field.name
            if key in changed or key == Keys.Twin.SOURCE_TYPES or (arrays and key in arrays):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub_type=sub)
        for key, (value, vtype) in changed.items():
            w.add_key_value(key, value, vtype)
        for key, values in (arrays or {}).items():
            w.add_array(key, values)
        w.add_array(Keys.Twin.SOURCE_TYPES, source_types)
        for name, t in tensors.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
