"""A GGUF run by llama.cpp on token chunks and scored the way llama-perplexity does: NLL of the
next token, and against a reference model KL divergence and top-1 agreement.

Each chunk is evaluated from an empty KV cache, its first token replaced by BOS where the
vocabulary uses one, and only its second half is scored: the logits at positions ctx/2 … ctx-2
predict tokens ctx/2+1 … ctx-1, so every scored token has at least ctx/2 of context. The planner
measures plans with it (held-in tokens); `windq eval` and the bench judge files with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from windq import llamacpp
from windq.errors import InputError
from windq.models.gguf_model import check_gguf
from windq.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class EvalResult:
    model: str
    text: str
    ctx: int
    n_chunks: int
    n_scored: int
    ppl: float
    ppl_stderr: float
    kld: float | None = None  # mean KL(ref ‖ model) per scored token, nats
    kld_median: float | None = None
    top1: float | None = None  # share of scored tokens where both models' argmax agree
    ref: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, vectorised; sums in float64 as llama-perplexity does."""
    x = logits.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x - m - lse


class Runner:
    """One model loaded in llama.cpp for whole-chunk scoring."""

    def __init__(self, path: str | Path, ctx: int, threads: int | None = None):
        check_gguf(path)
        lib = llamacpp.llama_cpp()
        self.path = Path(path)
        self.llm = llamacpp.load_llama(
            path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
            n_threads=threads or os.cpu_count(), n_threads_batch=threads or os.cpu_count(),
        )  # fmt: skip
        self.ctx = ctx
        self.tokenizer = Tokenizer(path, self.llm)
        self._lib = lib
        self._batch = lib.llama_batch_init(ctx, 0, 1)

    def scored_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits ((ctx/2 - 1) × vocab) at positions ctx/2 … ctx-2 of one chunk evaluated from an
        empty cache. Only those positions get logits: the output head on the unscored half
        would be a tenth of the decode spent for nothing."""
        lib, ctx, first = self._lib, self.ctx, self.ctx // 2
        chunk = [int(t) for t in tokens]
        if self.tokenizer.add_bos:
            chunk[0] = self.tokenizer.bos
        b = self._batch
        for i, t in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, first <= i < ctx - 1
            b.seq_id[i][0] = 0
        b.n_tokens = ctx
        c = self.llm._ctx.ctx
        lib.llama_memory_clear(lib.llama_get_memory(c), True)
        if lib.llama_decode(c, b) != 0:
            raise InputError(f"{self.path}: llama.cpp could not decode a chunk of {ctx} tokens")
        n_vocab = self.llm.n_vocab()
        out = np.empty((ctx - 1 - first, n_vocab), dtype=np.float32)
        for k in range(len(out)):
            out[k] = np.ctypeslib.as_array(lib.llama_get_logits_ith(c, first + k), shape=(n_vocab,))
        return out

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self.llm.close()


@dataclass
class ChunkScores:
    """Per scored token of one chunk: NLL of the next token, and against a reference the KL
    divergence and whether both argmaxes agree."""

    nll: np.ndarray
    kld: np.ndarray | None = None
    agree: np.ndarray | None = None


def score_chunk(runner: Runner, chunk: np.ndarray, lp_ref: np.ndarray | None = None) -> ChunkScores:
    """Score one chunk; `lp_ref` is the reference's log-softmax at the same positions."""
    return score_logprobs(log_softmax(runner.scored_logits(chunk)), chunk[runner.ctx // 2 + 1 :], lp_ref)


def score_logprobs(lp: np.ndarray, targets: np.ndarray, lp_ref: np.ndarray | None = None) -> ChunkScores:
    """Scores from log-probabilities at the scored positions and the tokens that follow them."""
    nll = -lp[np.arange(len(targets)), targets]
    if lp_ref is None:
        return ChunkScores(nll)
    return ChunkScores(nll, (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1), lp_ref.argmax(axis=-1) == lp.argmax(axis=-1))


def summarize(model: str | Path, scores: Sequence[ChunkScores], *, ctx: int, text_name: str, ref: str | Path | None = None) -> EvalResult:
    """One EvalResult from the scores of every chunk."""
    nll = np.concatenate([s.nll for s in scores]).astype(np.float64)
    mean = float(nll.mean())
    # llama-perplexity's uncertainty: the standard error of the mean NLL, carried through exp().
    stderr = math.exp(mean) * float(nll.std(ddof=1) / math.sqrt(len(nll)))
    result = dict(model=str(model), text=text_name, ctx=ctx, n_chunks=len(scores), n_scored=len(nll), ppl=math.exp(mean), ppl_stderr=stderr)
    if ref is not None:
        kl = np.concatenate([s.kld for s in scores]).astype(np.float64)
        result.update(
            kld=float(kl.mean()), kld_median=float(np.median(kl)),
            top1=float(np.concatenate([s.agree for s in scores]).mean()), ref=str(ref),
        )  # fmt: skip
    return EvalResult(**result)


def evaluate_chunks(
    model_paths: Sequence[str | Path],
    chunks: np.ndarray,
    *,
    text_name: str = "tokens",
    ref_path: str | Path | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[EvalResult]:
    """Several models on the same token chunks (n_chunks × ctx), in lockstep, so the reference's
    logits are computed once per chunk for all of them."""
    n_chunks, ctx = chunks.shape
    check_ctx(ctx)
    runners = [Runner(p, ctx, threads) for p in model_paths]
    ref = Runner(ref_path, ctx, threads) if ref_path else None
    scores: list[list[ChunkScores]] = [[] for _ in runners]
    try:
        for i, chunk in enumerate(chunks):
            lp_ref = log_softmax(ref.scored_logits(chunk)) if ref is not None else None
            for k, runner in enumerate(runners):
                scores[k].append(score_chunk(runner, chunk, lp_ref))
            if progress:
                progress(i + 1, n_chunks)
    finally:
        for r in runners + ([ref] if ref is not None else []):
            r.close()
    return [summarize(p, s, ctx=ctx, text_name=text_name, ref=ref_path) for p, s in zip(model_paths, scores)]


def check_ctx(ctx: int) -> None:
    if ctx < 8 or ctx % 2:
        raise InputError(f"--ctx {ctx}: use an even context of at least 8 tokens")
