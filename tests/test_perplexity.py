import math

import numpy as np
import pytest

from windq.errors import InputError
from windq.evaluators.perplexity import evaluate
from windq.export.scoring import log_softmax


def test_log_softmax_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 300)).astype(np.float32) * 10
    ref = x - np.log(np.exp(x.astype(np.float64)).sum(axis=1, keepdims=True))
    assert np.allclose(log_softmax(x), ref, atol=1e-5)


def _direct_ppl(path, text: str, ctx: int, chunks: int) -> float:
    """An independent computation: llama-cpp-python's own logits_to_logprobs, one chunk at a time."""
    from llama_cpp import Llama

    from windq.llamacpp import load_llama

    llm = load_llama(path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    add_bos = llm._model.add_bos_token()
    nll, n = 0.0, 0
    for c in range(chunks):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logprobs = Llama.logits_to_logprobs(np.array(llm.scores[:ctx]))
        for pos in range(ctx // 2, ctx - 1):
            nll -= float(logprobs[pos, chunk[pos + 1]])
            n += 1
    llm.close()
    return math.exp(nll / n)


def test_ppl_matches_direct_llama_cpp_computation(synthetic_gguf, sample_text):
    r = evaluate(synthetic_gguf, sample_text, ctx=128, max_chunks=3)
    assert r.n_scored == 3 * 63
    assert r.ppl == pytest.approx(_direct_ppl(synthetic_gguf, sample_text, 128, 3), rel=1e-4)


def test_kld_against_itself_is_zero(synthetic_gguf, sample_text):
    r = evaluate(synthetic_gguf, sample_text, ctx=64, max_chunks=2, ref_path=synthetic_gguf)
    assert r.kld == pytest.approx(0.0, abs=1e-6)
    assert r.top1 == 1.0


def test_too_short_text_is_refused(synthetic_gguf):
    with pytest.raises(InputError, match="where 2 × 128 are needed"):
        evaluate(synthetic_gguf, "too short", ctx=128)
