from pathlib import Path

import gguf
import numpy as np
import pytest

from helpers import assert_same_tensor_bytes
from helpers import assert_one_line_error, windq
from windq.errors import CalibrationError, InputError
from windq.export.quantize import export_gguf
from windq.models.gguf_model import GGUFModel
from windq.models.sources import Text, wiki_text
from windq.pipeline.calibrate import CalibrationConfig, calibrate, save_calibration
from windq.pipeline.imatrix import check_matches, load_imatrix, read_imatrix
from windq.plan import make_plan

FIXTURE = Path(__file__).parent / "data" / "llama-imatrix-synthetic.gguf"
FIXTURE_MODEL_SHA = "58f40b35d30f2d67cc37627f0efebd8370183606c6a3256c1ea43a450c1c66af"


@pytest.fixture(scope="module")
def synthetic_calibration(synthetic_gguf):
    text = Text("cal", wiki_text("calibration").content[:40000])
    return calibrate(GGUFModel(synthetic_gguf), text, CalibrationConfig(tokens=1024, ctx=256))


def test_importance_matches_llama_imatrix(synthetic_gguf, synthetic_calibration):
    """Same model, text, context and chunks as tests/data/README.md: torch hooks vs llama.cpp's collector."""
    assert GGUFModel(synthetic_gguf).sha256 == FIXTURE_MODEL_SHA, "synthetic model changed: regenerate the fixture"
    ref = read_imatrix(FIXTURE)
    ours = synthetic_calibration.imatrix
    assert ref.chunk_size == 256 and ref.chunk_count == 4
    assert set(ref.sums) <= set(ours.sums)  # llama-imatrix skips output.weight by default; windq keeps it
    for name in ref.sums:
        assert ours.counts[name] == ref.counts[name] == 1024
        np.testing.assert_allclose(ours.data[name], ref.data[name], rtol=3e-3)


def test_imatrix_file_round_trips_through_llama_quantize(synthetic_gguf, synthetic_calibration, tmp_path):
    m = GGUFModel(synthetic_gguf)
    save_calibration(synthetic_calibration, tmp_path / "cal")
    loaded = load_imatrix(tmp_path / "cal" / "imatrix.gguf", m)
    assert loaded.counts == synthetic_calibration.imatrix.counts
    for k, v in synthetic_calibration.imatrix.sums.items():
        assert np.array_equal(loaded.sums[k], v.astype(np.float32))

    r = gguf.GGUFReader(tmp_path / "cal" / "imatrix.gguf")  # the layout llama-imatrix writes
    assert r.get_field("general.type").contents() == "imatrix"
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == (512, 1) and shapes["blk.0.ffn_down.weight.counts"] == (1, 1)

    tensors = {t.name: ("Q8_0" if t.name == "token_embd.weight" else "IQ2_XXS") for t in m.quantizable()}
    plan = make_plan(m, tensors, method="manual")
    from_file = export_gguf(m, plan, tmp_path / "file.gguf", imatrix=loaded.data)
    in_memory = export_gguf(m, plan, tmp_path / "mem.gguf", imatrix=synthetic_calibration.imatrix.data)
    assert_same_tensor_bytes(GGUFModel(from_file.path), GGUFModel(in_memory.path))


def test_llama_imatrix_file_is_usable_for_export(synthetic_gguf, tmp_path):
    m = GGUFModel(synthetic_gguf)
    im = load_imatrix(FIXTURE, m)
    tensors = {t.name: ("IQ2_XS" if t.name in im.sums else "Q4_K") for t in m.quantizable()}
    out = export_gguf(m, make_plan(m, tensors, method="manual"), tmp_path / "iq.gguf", imatrix=im.data)
    assert GGUFModel(out.path).tensors["blk.1.ffn_up.weight"].type_name == "IQ2_XS"


def test_text_shorter_than_one_context(synthetic_gguf, tmp_path):
    with pytest.raises(InputError, match=r"tiny: too short, \d+ tokens where 9 × 256 are needed"):
        calibrate(GGUFModel(synthetic_gguf), Text("tiny", "a few words"), CalibrationConfig(tokens=512, ctx=256))
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    r = windq("calibrate", synthetic_gguf, "--text", short, "--out", tmp_path / "cal")
    assert_one_line_error(r, "too short", "9 × 512")
    assert not (tmp_path / "cal").exists()


@pytest.mark.slow  # the real default model
def test_imatrix_for_another_model(default_gguf, tmp_path):
    with pytest.raises(CalibrationError, match="another model"):
        check_matches(read_imatrix(FIXTURE), GGUFModel(default_gguf))
    plan = tmp_path / "plan.json"
    from windq.plan import save_plan, uniform_plan

    save_plan(uniform_plan(GGUFModel(default_gguf), "Q8_0"), plan)
    r = windq("export", "default", "--plan", plan, "--imatrix", FIXTURE, "--gguf", tmp_path / "out.gguf")
    assert_one_line_error(r, "another model")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.slow  # the CLI end to end, torch loaded in a child process
def test_calibrate_cli_writes_the_folder(synthetic_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(wiki_text("calibration").content[:20000])
    r = windq("calibrate", synthetic_gguf, "--text", text, "--tokens", "512", "--ctx", "128", "--out", tmp_path / "cal")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == [
        "activations.npz", "calibration.json", "fisher.npz", "imatrix.gguf", "judge-tokens.npy", "tokens.npy",
    ]  # fmt: skip
    assert read_imatrix(tmp_path / "cal" / "imatrix.gguf").counts["blk.0.attn_q.weight"] == 512


def test_tensor_name_maps_are_built_once_inside_the_block_and_gguf_is_left_as_it_was():
    """transformers' GGUF loader asks gguf-py for the name map once per module; windq memoizes it
    while loading (27 of the 30 s the default took) and puts gguf's own function back after."""
    import gguf

    from windq.pipeline.calibrate import cached_tensor_name_maps

    original = gguf.get_tensor_name_map
    with cached_tensor_name_maps():
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.get_tensor_name_map is original
    assert original(gguf.MODEL_ARCH.LLAMA, 2) is not original(gguf.MODEL_ARCH.LLAMA, 2)  # what it saves: a new map each call


@pytest.mark.parametrize("tied", [False, True])
def test_the_output_heads_importance_is_what_the_head_sees_in_a_whole_forward(tmp_path, tied):
    """Calibration runs the decoder without the head (its logits are not needed) and gives the head
    the decoder's last hidden state: the same input a hook on the head sees when the model runs whole."""
    import torch

    from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf
    from windq.pipeline.calibrate import load_torch_model

    m = GGUFModel(write_synthetic_gguf(tmp_path / "m.gguf", SyntheticConfig(tied=tied)))
    cal = calibrate(m, wiki_text("calibration"), CalibrationConfig(tokens=256, ctx=64, fisher_chunks=1, judge_chunks=1, threads=1))
    head_tensor = "token_embd.weight" if tied else "output.weight"
    tm, seen = load_torch_model(m), []
    tm.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double().numpy()))
    with torch.inference_mode():
        for chunk in cal.tokens:
            tm(torch.from_numpy(chunk[None]), use_cache=False)
    x = np.concatenate([s.reshape(-1, s.shape[-1]) for s in seen])
    assert cal.imatrix.counts[head_tensor] == len(x) == 256
    np.testing.assert_allclose(cal.stats[head_tensor].sum_sq, (x**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(cal.stats[head_tensor].max_abs, np.abs(x).max(0), rtol=1e-6)
