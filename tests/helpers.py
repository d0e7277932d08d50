"""Test helpers shared by several test files."""

from __future__ import annotations

from pathlib import Path

from windq.export import llama
from windq.models.gguf_model import GGUFModel


def stock_quantize(src: Path, dst: Path, type_name: str, imatrix=None) -> GGUFModel:
    """llama.cpp's quantizer with a file type and `pure`, no windq overrides: the reference."""
    llama.quantize_file(str(src), str(dst), ftype=llama.ftype_for(type_name), pure=True, imatrix=imatrix)
    return GGUFModel(dst)


def assert_same_tensor_bytes(a: GGUFModel, b: GGUFModel) -> None:
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].type_id == b.tensors[name].type_id, name
        assert a.raw(name).tobytes() == b.raw(name).tobytes(), name
