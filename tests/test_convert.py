"""`windq convert`: HF llama checkpoints → GGUF, checked by round trip through transformers."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import hf_dir_from_gguf
from windq.cli import main
from windq.errors import InputError, UnsupportedModelError
from windq.evaluators.perplexity import evaluate
from windq.export import llama_quantize
from windq.models.convert import convert_hf, rope_interleave
from windq.models.gguf_model import GGUFModel
from windq.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def synthetic_hf(synthetic_gguf, tmp_path_factory):
    return hf_dir_from_gguf(synthetic_gguf, tmp_path_factory.mktemp("hf") / "tiny")


def assert_same_model(a: GGUFModel, b: GGUFModel, text: str, ctx: int) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, info in a.tensors.items():
        assert b.tensors[name].shape == info.shape, name
        assert a.raw(name).tobytes() == b.raw(name).tobytes(), name
    ta, tb = Tokenizer(a.path), Tokenizer(b.path)
    assert ta.add_bos == tb.add_bos
    assert np.array_equal(ta.tokenize(text), tb.tokenize(text))
    ra = evaluate(a.path, text, ctx=ctx, max_chunks=2, threads=2)
    rb = evaluate(b.path, text, ctx=ctx, max_chunks=2, threads=2)
    assert ra.ppl == rb.ppl


def test_round_trip_synthetic_is_exact(synthetic_gguf, synthetic_hf, tmp_path, sample_text):
    """GGUF → transformers → save_pretrained → convert: every tensor byte-identical (so the Q/K row
    order is undone exactly), SentencePiece-style vocabulary tokenizes the same, same PPL."""
    report = convert_hf(synthetic_hf, tmp_path / "rt.gguf")
    assert report.vocab == "llama"
    assert_same_model(GGUFModel(synthetic_gguf), GGUFModel(report.path), sample_text[:20_000], ctx=64)


@pytest.mark.slow
def test_round_trip_default_model_matches_its_f32(default_gguf, tmp_path, sample_text):
    """The default SmolLM2 (Q4_1) through transformers and back equals llama.cpp's own F32 of it,
    byte for byte, and the byte-level BPE vocabulary gets llama.cpp's `smollm` pre-tokenizer."""
    f32 = tmp_path / "orig-f32.gguf"
    llama_quantize.quantize_file(str(default_gguf), str(f32), ftype=int(gguf.LlamaFileType.ALL_F32))
    hf = hf_dir_from_gguf(default_gguf, tmp_path / "hf")
    report = convert_hf(hf, tmp_path / "rt.gguf")
    assert report.vocab == "gpt2 (pre smollm)"
    assert_same_model(GGUFModel(f32), GGUFModel(report.path), sample_text, ctx=512)


def test_rope_interleave_pairs_halves():
    # one head of 4 rows: HF order [r0 r1 | r2 r3] rotates (r0,r2) and (r1,r3) together; ggml wants them adjacent
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert rope_interleave(w, 1)[:, 0].tolist() == [0, 4, 2, 6]


def test_f16_halves_matrices_keeps_norms(synthetic_hf, tmp_path):
    m = GGUFModel(convert_hf(synthetic_hf, tmp_path / "f16.gguf", outtype="f16").path)
    assert m.tensors["blk.0.attn_q.weight"].type_name == "F16"
    assert m.tensors["blk.0.attn_norm.weight"].type_name == "F32"


def test_refuses_a_tokenizer_llama_cpp_cannot_reproduce(synthetic_hf, tmp_path):
    """A pre-tokenizer no llama.cpp name matches is refused, never written with other tokens."""
    bad = tmp_path / "bad"
    shutil.copytree(synthetic_hf, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Split", "pattern": {"String": "e"}, "behavior": "Isolated", "invert": False}
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer"):
        convert_hf(bad, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope scaling"),
    ],
)
def test_refuses_unsupported_configs(synthetic_hf, tmp_path, change, match):
    d = tmp_path / "m"
    shutil.copytree(synthetic_hf, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=match):
        convert_hf(d, tmp_path / "x.gguf")


def test_not_a_model_dir(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        convert_hf(tmp_path, tmp_path / "x.gguf")


def test_cli_convert(synthetic_hf, tmp_path):
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(main, ["convert", str(synthetic_hf), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "21 tensors" in r.output and out.is_file()
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "nowhere"), "-o", str(out)])
    assert r.exit_code == 2 and "config.json" in r.output
