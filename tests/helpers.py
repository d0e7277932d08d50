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


def hf_dir_from_gguf(src: Path, out: Path) -> Path:
    """What a user downloading from the hub would have: a save_pretrained folder (safetensors,
    config.json, tokenizer.json), made here by transformers from a GGUF so no download is needed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # transformers refuses to save a model it marks as GGUF-quantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(out)
    return out
