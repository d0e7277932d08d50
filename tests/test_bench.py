import pytest
import json

from windq.errors import InputError
from windq.evaluators.bench import Row, best_within, front_kld_at, pareto_front, parse_method, quick_config, run_bench, size_at_equal_ppl


@pytest.mark.slow  # a long end-to-end run through llama.cpp
def test_quick_bench_runs_end_to_end_and_resumes(synthetic_gguf, tmp_path):
    cfg = quick_config(str(synthetic_gguf))
    first = run_bench(cfg, tmp_path)
    methods = {(r["variant"], r["method"]) for r in first["rows"]}
    assert ("unaligned", "llama.cpp:Q8_0") in methods and ("aligned", "knapsack") in methods
    for r in first["rows"]:
        assert r["ppl"] > 1 and r["kld"] >= 0 and r["gen_tok_s"] > 0
        if r["budget"] is not None:
            assert r["bpw"] <= r["budget"] + 1e-9  # exported files honour the budget
    assert (tmp_path / "pareto-ppl.png").stat().st_size > 0 and "| variant |" in (tmp_path / "bench.md").read_text()
    # fidelity at the budget, per variant and per source-type setting the methods use
    fid = {(f["variant"], f["excluded"]): f for f in first["fidelity"]}
    assert set(fid) == {(v, e) for v in ("unaligned", "aligned") for e in (False, True)}
    for f in fid.values():
        assert f["plans"] == 3 and -1 <= f["spearman"] <= 1 and f["optimum_rank"] >= 1
    assert "Fidelity (`windq fidelity`" in (tmp_path / "bench.md").read_text() and "| judge ceiling |" in (tmp_path / "bench.md").read_text()
    # a rerun reads every result from the cache instead of recomputing it
    def cache():
        return {p.name: p.stat().st_mtime_ns for d in ("results", "evals", "gguf") for p in (tmp_path / d).iterdir()}

    cached = cache()
    second = run_bench(cfg, tmp_path)
    assert cache() == cached
    assert json.dumps(first["rows"]) == json.dumps(second["rows"])


def test_size_at_equal_ppl_interpolates_the_pareto_front():
    def row(mb, ppl):
        return Row("v", "llama.cpp:x", None, mb, 0, ppl, 0, 0, 0, 0)

    stock = [row(50, 20.0), row(100, 10.0), row(80, 30.0)]  # the 80 MB mix is off the front
    mid = size_at_equal_ppl(float(10 * 2**0.5), stock)  # halfway in log PPL
    assert abs(mid - 75) < 1e-9
    assert size_at_equal_ppl(5.0, stock) is None


def test_front_kld_at_equal_bytes_and_the_best_rival_that_fits():
    def row(mb, kld, method="llama.cpp:x"):
        return Row("v", method, None, mb, 0, 0, kld, 0, 0, 0)

    stock = [row(50, 0.4), row(100, 0.1), row(80, 0.5)]  # the 80 MB mix is off the front
    assert abs(front_kld_at(75, stock) - 0.2) < 1e-12  # halfway in size, halfway in log KLD
    assert front_kld_at(49.9, stock) is None and front_kld_at(100.1, stock) is None  # no front to compare with
    assert front_kld_at(75, stock + [row(100, 0.0)]) == 0.2  # a front ending at the source itself: linear there
    assert best_within(99.9, stock).size_mb == 50  # 0.4 beats the off-front 0.5; 100 MB does not fit
    assert best_within(100, stock).kld == 0.1 and best_within(49, stock) is None


@pytest.mark.slow  # llama.cpp evaluates two files twice (5 s); make test runs it, make test-fast does not
def test_lockstep_eval_resumes_chunk_by_chunk_to_the_same_scores(synthetic_gguf, sample_text, tmp_path):
    """An evaluation stopped after one chunk and resumed scores exactly what one uninterrupted
    pass scores, and both equal evaluate_chunks (no cache, one runner per model)."""
    from windq.evaluators.bench import EvalCache, evaluate_lockstep
    from windq.export.scoring import evaluate_chunks, summarize
    from windq.models.tokenizer import Tokenizer

    from helpers import stock_quantize

    q8 = stock_quantize(synthetic_gguf, tmp_path / "q8.gguf", "Q8_0").path
    tok = Tokenizer(synthetic_gguf)
    chunks = tok.tokenize(sample_text)[: 3 * 64].reshape(3, 64)
    tok.close()
    files = [synthetic_gguf, q8]

    def caches(folder):
        return [EvalCache(folder, str(f), "ref", "sample", 64) for f in files]

    resumed = caches(tmp_path / "a")
    evaluate_lockstep(files, resumed, chunks[:1], synthetic_gguf, threads=2)
    assert [len(c) for c in resumed] == [1, 1]
    resumed = caches(tmp_path / "a")  # as a new run would: read back from disk
    evaluate_lockstep(files, resumed, chunks, synthetic_gguf, threads=2)
    once = caches(tmp_path / "b")
    evaluate_lockstep(files, once, chunks, synthetic_gguf, threads=2)
    direct = evaluate_chunks(files, chunks, text_name="sample", ref_path=synthetic_gguf, threads=2)
    for a, b, d in zip(resumed, once, direct):
        ra, rb = (summarize(d.model, c.scores(3), ctx=64, text_name="sample", ref=synthetic_gguf) for c in (a, b))
        assert ra == rb == d
    assert direct[0].kld == 0.0 and direct[1].kld > 0  # the reference against itself, and Q8_0 against it


def test_speeds_are_measured_in_one_sitting_and_again_when_a_file_joins(tmp_path):
    """Speeds from different sittings are not comparable, so a new file re-measures the whole set;
    an unchanged (or smaller) set is read back; each speed is the median of its rounds."""
    from windq.evaluators.bench import measure_speeds

    calls = []

    def fake_speed(path, n_tokens, threads):
        calls.append(path.name)
        runs = {"a": [10.0, 30.0, 20.0, 40.0, 40.0, 40.0], "b": [5.0, 1.0, 3.0, 2.0, 2.0, 2.0], "c": [7.0, 7.0, 7.0]}
        return runs[path.name][calls.count(path.name) - 1]

    cache = tmp_path / "speed.json"
    files = {"sha-a": tmp_path / "a", "sha-b": tmp_path / "b"}
    assert measure_speeds(files, cache, 8, 2, 3, speed=fake_speed) == {"sha-a": 20.0, "sha-b": 3.0}
    assert calls == ["a", "b"] * 3  # round-robin, not file by file
    assert measure_speeds({"sha-b": files["sha-b"]}, cache, 8, 2, 3, speed=fake_speed) == {"sha-b": 3.0}
    assert len(calls) == 6  # read back
    files["sha-c"] = tmp_path / "c"
    speeds = measure_speeds(files, cache, 8, 2, 3, speed=fake_speed)
    assert calls[6:] == ["a", "b", "c"] * 3 and speeds == {"sha-a": 40.0, "sha-b": 2.0, "sha-c": 7.0}
    assert measure_speeds(files, cache, 16, 2, 3, speed=lambda *a: 1.0) == dict.fromkeys(files, 1.0)  # a new setup too


def test_bench_methods_name_an_allocator_a_granularity_and_modifiers():
    assert parse_method("knapsack") == ("knapsack", "tensor", ())
    assert parse_method("ppo@chunk:256+verify") == ("ppo", "chunk:256", ("verify",))
    assert parse_method("knapsack+verify+exclude") == ("knapsack", "tensor", ("verify", "exclude"))
    assert parse_method("ppo+policy") == ("ppo", "tensor", ("policy",))
    for bad in ("greedy", "knapsack+fast", "uniform+", "knapsack+policy"):
        with pytest.raises(InputError):
            parse_method(bad)


def test_a_transferred_policy_is_checked_before_anything_is_built(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(quick_config(), methods=("knapsack", "ppo+policy"))
    with pytest.raises(InputError, match="needs --policy"):
        run_bench(cfg, tmp_path / "a")
    pickled = tmp_path / "policy.zip"
    pickled.write_bytes(b"PK\x03\x04 an sb3 zip")
    with pytest.raises(InputError):
        run_bench(dataclasses.replace(cfg, policy=str(pickled)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pareto_front_keeps_the_points_nothing_beats():
    pts = [(5.0, 0.05), (4.0, 0.2), (4.5, 0.3), (5.5, 0.05), (6.0, 0.01)]
    assert pareto_front(pts) == [(4.0, 0.2), (5.0, 0.05), (6.0, 0.01)]


def test_judge_pairs_match_candidates_to_bench_files_by_exact_size():
    from windq.evaluators.bench import judge_pairs

    def row(method, bpw, kld, held_in=()):
        return Row("unaligned", method, 5.0, 0, bpw, 0, kld, 0, 0, 0, held_in=list(held_in))

    cands = [{"label": "windq knapsack", "bpw": 4.99, "kl": 0.02}, {"label": "uniform IQ4_NL", "bpw": 4.507, "kl": 0.17},
             {"label": "llama.cpp IQ2_M", "bpw": 4.984, "kl": 0.4}, {"label": "llama.cpp Q2_K", "bpw": 5.139, "kl": 0.3}]  # fmt: skip
    verified = row("knapsack+verify", 4.99, 0.05, cands)
    rows = [verified, row("uniform", 4.507, 0.16), row("llama.cpp:IQ2_M", 4.984, 0.38), row("llama.cpp:Q8_0", 8.5, 0.006)]
    assert judge_pairs(verified, rows) == [(0.02, 0.05), (0.17, 0.16), (0.4, 0.38)]  # Q2_K was not a bench file


def test_bench_variants_are_checked():
    from windq.evaluators.bench import runs_on, split_width

    assert split_width("unaligned") is None and split_width("split:512") == 512
    for bad in ("split:", "split:x", "split:0", "twisted"):
        with pytest.raises(InputError, match="bench variant"):
            split_width(bad)
    assert runs_on("split:256", "knapsack+exclude") and runs_on("aligned", "ppo")
    assert not runs_on("split:256", "knapsack+verify") and not runs_on("split:256", "ppo@chunk:256")


@pytest.mark.slow  # a long end-to-end run through llama.cpp
def test_bench_runs_the_ffn_split_beside_the_dense_plans(synthetic_gguf, tmp_path):
    """A split:N variant is planned, exported and evaluated like the others, set beside the dense file
    of the same method and budget; stock mixes and the torch-only methods are not run on it, and say so."""
    from windq.evaluators.bench import BenchConfig

    cfg = BenchConfig(model=str(synthetic_gguf), budgets=(5.0,), methods=("knapsack", "knapsack+verify"), mixes=("Q8_0",),
                      variants=("unaligned", "split:256"), calib_tokens=1024, chunks=2, ppo_episodes=1, speed_tokens=8)  # fmt: skip
    result = run_bench(cfg, tmp_path)
    got = {(r["variant"], r["method"]) for r in result["rows"]}
    assert got == {("unaligned", "llama.cpp:Q8_0"), ("unaligned", "knapsack"), ("unaligned", "knapsack+verify"), ("split:256", "knapsack")}
    split = next(r for r in result["rows"] if r["variant"] == "split:256")
    assert split["bpw"] <= 5.0 + 1e-9 and split["kld"] >= 0 and split["gen_tok_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "Not run (" in md and "split:256 knapsack+verify" in md
    assert "| split:256 | knapsack | 5 |" in md  # the split-against-dense table
