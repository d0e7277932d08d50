"""Perplexity and KL divergence computed by llama.cpp (llama-cpp-python), the way llama-perplexity does.

The text is tokenized once (BOS first if the vocabulary adds one) and cut into chunks of `ctx`
tokens. Each chunk is evaluated from an empty KV cache, its first token replaced by BOS where
the vocabulary uses one, and only its second half is scored: the logits at positions
ctx/2 … ctx-2 predict tokens ctx/2+1 … ctx-1, so every scored token has at least ctx/2 of context.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from windq.errors import InputError
from windq.export import llama
from windq.models.gguf_model import GGUFModel
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
        GGUFModel(path)  # one clear error for a missing file or non-GGUF before llama.cpp sees it
        llama.llama_cpp()
        from llama_cpp import Llama

        self.path = Path(path)
        try:
            self.llm = Llama(
                model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=threads or os.cpu_count(), n_threads_batch=threads or os.cpu_count(), verbose=False,
            )  # fmt: skip
        except Exception as e:
            raise InputError(f"{path}: llama.cpp could not load the model ({llama.last_error()})") from e
        self.ctx = ctx
        self.tokenizer = Tokenizer(path, self.llm)

    def chunk_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (ctx × vocab) of one chunk evaluated from an empty cache."""
        chunk = tokens.tolist()
        if self.tokenizer.add_bos:
            chunk[0] = self.tokenizer.bos
        self.llm.reset()
        self.llm.eval(chunk)
        return np.array(self.llm.scores[: len(chunk)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()


def evaluate(
    model_path: str | Path,
    text: str,
    *,
    text_name: str = "text",
    ctx: int = 512,
    max_chunks: int | None = None,
    ref_path: str | Path | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """PPL of `model_path` on `text`; with `ref_path`, also KLD and top-1 agreement against it."""
    _check_ctx(ctx)
    GGUFModel(model_path)  # one clear error for a missing file or non-GGUF before llama.cpp sees it
    tok = Tokenizer(model_path)
    try:
        tokens = tok.tokenize(text, max_tokens=None if max_chunks is None else max(max_chunks, 2) * ctx)
    finally:
        tok.close()
    if len(tokens) < 2 * ctx:
        raise InputError(f"{text_name}: {len(tokens)} tokens; perplexity with a context of {ctx} needs at least {2 * ctx}")
    n_chunks = len(tokens) // ctx if max_chunks is None else min(max_chunks, len(tokens) // ctx)
    chunks = tokens[: n_chunks * ctx].reshape(n_chunks, ctx)
    return evaluate_chunks([model_path], chunks, text_name=text_name, ref_path=ref_path, threads=threads, progress=progress)[0]


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
    _check_ctx(ctx)
    runners = [Runner(p, ctx, threads) for p in model_paths]
    ref = Runner(ref_path, ctx, threads) if ref_path else None
    first = ctx // 2
    nll: list[list[np.ndarray]] = [[] for _ in runners]
    klds: list[list[np.ndarray]] = [[] for _ in runners]
    agree: list[list[np.ndarray]] = [[] for _ in runners]
    try:
        for i, chunk in enumerate(chunks):
            targets = chunk[first + 1 :]
            lp_ref = log_softmax(ref.chunk_logits(chunk)[first:-1]) if ref is not None else None
            for k, runner in enumerate(runners):
                lp = log_softmax(runner.chunk_logits(chunk)[first:-1])
                nll[k].append(-lp[np.arange(len(targets)), targets])
                if lp_ref is not None:
                    klds[k].append((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1))
                    agree[k].append(lp_ref.argmax(axis=-1) == lp.argmax(axis=-1))
            if progress:
                progress(i + 1, n_chunks)
    finally:
        for r in runners + ([ref] if ref is not None else []):
            r.close()

    results = []
    for k, path in enumerate(model_paths):
        nll_all = np.concatenate(nll[k]).astype(np.float64)
        mean = float(nll_all.mean())
        # llama-perplexity's uncertainty: the standard error of the mean NLL, carried through exp().
        stderr = math.exp(mean) * float(nll_all.std(ddof=1) / math.sqrt(len(nll_all)))
        result = dict(
            model=str(path), text=text_name, ctx=ctx, n_chunks=n_chunks, n_scored=len(nll_all),
            ppl=math.exp(mean), ppl_stderr=stderr,
        )  # fmt: skip
        if ref is not None:
            kl = np.concatenate(klds[k]).astype(np.float64)
            result.update(
                kld=float(kl.mean()), kld_median=float(np.median(kl)),
                top1=float(np.concatenate(agree[k]).mean()), ref=str(ref_path),
            )  # fmt: skip
        results.append(EvalResult(**result))
    return results


def _check_ctx(ctx: int) -> None:
    if ctx < 8 or ctx % 2:
        raise InputError(f"--ctx {ctx}: use an even context of at least 8 tokens")
