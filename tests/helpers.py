"""Test helpers shared by several test files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from windq.export import llama_quantize
from windq.models.gguf_model import GGUFModel


def stock_quantize(src: Path, dst: Path, type_name: str, imatrix=None) -> GGUFModel:
    """llama.cpp's quantizer with a file type and `pure`, no windq overrides: the reference."""
    llama_quantize.quantize_file(str(src), str(dst), ftype=llama_quantize.ftype_for(type_name), pure=True, imatrix=imatrix)
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


def windq(*args, cwd=None, env=None):
    """The CLI in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "windq", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def assert_one_line_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def allocation_env(gguf_path: Path, statsdir: Path, bpw: float = 4.0):
    """The PPO env of a calibrated model at a budget, at tensor granularity."""
    from windq.pipeline import allocate, ppo
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.planner import weight_column_stats
    from windq.pipeline.sensitivity import load_or_compute

    m = GGUFModel(gguf_path)
    im = load_imatrix(statsdir / "imatrix.gguf", m)
    tables = load_or_compute(m, im.data, statsdir, group=256, imatrix_sha256=im.sha256())
    p = allocate.build_problem(m, tables)
    feats = ppo.unit_features(p, weight_column_stats(m, tables.tensors), im.data)
    return ppo.AllocationEnv(p, feats, bpw)
