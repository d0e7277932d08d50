"""The real loss of a plan: KL divergence of a fake-quantized torch model from the reference,
on held-in calibration tokens.

The fake-quantized model holds, for every tensor, exactly what the exported GGUF will: the weight
quantized and decoded by ggml with the same importance data (or the source bytes, where the
planned type is the source type and llama.cpp copies them). Quantized bytes are cached per
(tensor, type), so an allocator that revisits a choice pays only the decode; the cache lives in an
unlinked temporary file, not in the process's memory (`SpilledBytes`).
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Hashable, Mapping

import numpy as np

from windq import ggml, registry
from windq.models.gguf_model import GGUFModel
from windq.pipeline.calibrate import load_torch_model, tensor_params, weight_processor

BATCH_TOKENS = 4096  # judge tokens run through the model at once


class SpilledBytes:
    """A write-once cache of byte arrays in an unlinked temporary file (in TMPDIR), read back one
    entry at a time.

    Why a file: the cache holds every (tensor, type) a planner has tried, which is a whole plan's
    quantized bytes or more (measured: peak anonymous memory of one PPO episode at 1.51B
    parameters 2,145 MB against 969 MB at 0.5B, the difference the cached bytes of the extra
    layers). Written to a file they sit in the page cache, which the kernel writes back and
    reclaims under pressure, as it does the memory-mapped GGUF's; the process holds one tensor's
    bytes at a time. The file goes when the cache is closed or the process ends."""

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self._at: dict[Hashable, tuple[int, int]] = {}  # key → (offset, length)
        self.nbytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._at

    def __len__(self) -> int:
        return len(self._at)

    def put(self, key: Hashable, data: np.ndarray) -> None:
        if key in self._at:
            raise KeyError(f"{key!r} is cached already")
        raw = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        done = 0
        while done < raw.nbytes:  # one write stops short at 2 GiB on Linux
            n = os.pwrite(self._file.fileno(), raw[done:], self.nbytes + done)
            if n == 0:
                raise OSError(f"the real loss's cache in {tempfile.gettempdir()} took no more bytes")
            done += n
        self._at[key] = (self.nbytes, raw.nbytes)
        self.nbytes += raw.nbytes

    def get(self, key: Hashable) -> np.ndarray:
        offset, length = self._at[key]
        out = np.empty(length, dtype=np.uint8)
        view, done = memoryview(out), 0
        while done < length:
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"the real loss's cache ended {length - done} bytes short")
            done += n
        return out

    def close(self) -> None:
        self._file.close()


class RealLoss:
    def __init__(
        self, model: GGUFModel, imatrix: Mapping[str, np.ndarray] | None, tokens: np.ndarray, *, stream: bool = False,
        threads: int | None = None, cache: SpilledBytes | None = None,
    ):
        """With `stream`, the model runs one module at a time (pipeline/streaming.py), each planned
        weight decoded from the plan's quantized bytes as its module runs: memory of one module's
        weights plus the quantized bytes cache, not the float32 model. `threads` quantize a plan's
        new (tensor, type) pairs side by side (default: every core). `cache`: another judge's quantized
        bytes, of the same model and imatrix, to share rather than quantize again."""
        import torch

        self.model = model
        self.threads = threads or os.cpu_count() or 1
        self.imatrix = dict(imatrix or {})
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1, tokens.shape[-1]))
        self._batch = max(1, BATCH_TOKENS // self.tokens.shape[1])  # sequences a batch, fixed with the reference
        self._bytes = cache if cache is not None else SpilledBytes()
        self._types: dict[str, str] = {}  # the plan a streamed model runs (a tensor absent: its source)
        self._planned = {t.name for t in model.quantizable()}
        self._changed: set[str] = set()  # tensors whose torch weights a plan has overwritten
        if stream:
            from windq.pipeline.streaming import StreamedModel

            self.sm = StreamedModel(model, source=self._streamed_weights)
            self.tm, self.params = self.sm.tm, None
        else:
            self.sm = None
            self.tm = load_torch_model(model)
            self.params = tensor_params(model, self.tm)
        self.processor = weight_processor(model, self.tm)  # GGUF tensor → torch layout (llama: Q and K rows permuted)
        self.ref_logp = [self._logp(batch) for batch in self._batches(None)]

    @property
    def cache(self) -> SpilledBytes:
        """The quantized bytes of every (tensor, type) this judge has measured, to share with another."""
        return self._bytes

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    def _batches(self, sequences: int | None):
        """The first `sequences` judge sequences in batches of about BATCH_TOKENS tokens: a batch's
        logits, log-probabilities and KL terms are each tokens × vocabulary floats (0.8 GB per
        4,096 tokens of the default's 49,152-token vocabulary), so a judge of 16k tokens run as one
        batch would hold several GB of them at once."""
        tokens, step = self.tokens[:sequences], self._batch
        return [tokens[i : i + step] for i in range(0, len(tokens), step)]

    def _logp(self, tokens):
        import torch

        with torch.inference_mode():
            logits = self.sm(tokens).logits if self.sm else self.tm(tokens, use_cache=False).logits
            return torch.log_softmax(logits.float(), dim=-1)

    def _streamed_weights(self, tensor: str) -> np.ndarray:
        if tensor in self._types:
            return self.weights(tensor, self._types[tensor])
        return self.sm.file_weights(tensor)

    def _copied(self, tensor: str, type_name: str) -> bool:
        """Planned at its source type: llama.cpp copies the file's bytes, so nothing is quantized."""
        return registry.get(type_name).id == self.model.tensors[tensor].type_id

    def weights(self, tensor: str, type_name: str | None) -> np.ndarray:
        """The torch weight of `tensor` planned as `type_name` (None: its source, as the file holds it)."""
        info = self.model.tensors[tensor]
        rows = info.n_elements // info.n_per_row
        if type_name is None or self._copied(tensor, type_name):
            w = ggml.dequantize(info.type_id, self.model.raw(tensor), (rows, info.n_per_row))
        else:
            key = (tensor, type_name)
            if key not in self._bytes:
                self._bytes.put(key, self._quantize(key))
            w = ggml.dequantize(registry.get(type_name).id, self._bytes.get(key), (rows, info.n_per_row))
        return self.processor.process(w, tensor).weights

    def _quantize(self, key: tuple[str, str]) -> np.ndarray:
        tensor, type_name = key
        info = self.model.tensors[tensor]
        return ggml.quantize(registry.get(type_name).id, self.model.dequantized(tensor), self.imatrix.get(tensor), experts=info.n_mat)

    def prepare(self, types: Mapping[str, str]) -> None:
        """Quantize the (tensor, type) pairs of `types` not cached yet, on `threads` at once, largest
        first (ggml's quantizers release the GIL). Profiled, quantizing a plan's new pairs one after
        another took 126 of the 225 s a default `windq plan` spent verifying. Each thread holds one
        tensor as float32 while it works, so a streamed model (where memory is the point) keeps
        quantizing one at a time, as its modules run."""
        if self.sm or self.threads < 2:
            return  # _weights quantizes them as it goes
        todo = [(t, ty) for t, ty in types.items() if not self._copied(t, ty) and (t, ty) not in self._bytes]
        if not todo:
            return  # every pair cached already (most of a PPO run's episodes)
        todo.sort(key=lambda k: -self.model.tensors[k[0]].n_elements)
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            jobs = {pool.submit(self._quantize, key): key for key in todo}
            for job in as_completed(jobs):
                self._bytes.put(jobs[job], job.result())  # each result spilled as it comes

    def kl(self, types: Mapping[str, str], sequences: int | None = None) -> float:
        """Mean KL(reference ‖ plan) per token, in nats (on the first `sequences` only, if given)."""
        return float(self.kl_per_sequence(types, sequences).mean())  # every sequence has the same length

    def kl_per_sequence(self, types: Mapping[str, str], sequences: int | None = None) -> np.ndarray:
        """Mean KL(reference ‖ plan) per token of each judge sequence (the first `sequences`), in nats."""
        import torch

        if self.sm:
            unknown = set(types) - self._planned
            if unknown:
                raise KeyError(f"not planned: {sorted(unknown)[0]}")
            self._types.update(types)
            return self._kl_now(sequences)
        self.prepare(types)
        self._write(types)
        return self._kl_now(sequences)

    def _write(self, types: Mapping[str, str | None]) -> None:
        import torch

        with torch.no_grad():
            for tensor, type_name in types.items():
                slot = self.params[tensor]
                slot.of(slot.param).copy_(torch.from_numpy(self.weights(tensor, type_name)).view(slot.shape))
        self._changed.update(types)

    def reset(self) -> None:
        """Every tensor back to the source's weights, as the judge was built."""
        if self.sm:
            self._types.clear()
            return
        self._write(dict.fromkeys(self._changed))
        self._changed.clear()

    def kl_alone(
        self, pairs: list[tuple[str, str]], sequences: int | None = None, progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """For each (tensor, type): the KL of the source with only that tensor quantized to that
        type, every other tensor as the file holds it. The judge is left at the source."""
        self.reset()
        out = np.empty(len(pairs))
        for i, (tensor, type_name) in enumerate(pairs):
            out[i] = self.kl({tensor: type_name}, sequences)
            self.reset()
            if progress:
                progress(i + 1, len(pairs))
        return out

    def kl_gradient(self, types: Mapping[str, str]) -> dict[str, np.ndarray]:
        """∂ KL(reference ‖ plan) / ∂ W for every planned tensor, at the plan `types` (a tensor absent:
        its source), KL the mean per token over every judge token; each gradient in the torch
        layout of `weights` (a tied head's share included in its embedding's). The judge is left
        holding the plan. One backward pass a sequence, so memory holds one sequence's activations."""
        import torch

        if self.sm:
            raise ValueError("the gradient of the real loss needs the whole torch model (not --stream)")
        self.prepare(types)
        self._write(types)
        before = [(p, p.requires_grad) for p in self.tm.parameters()]
        for p, _ in before:
            p.requires_grad_(False)
        for s in self.params.values():
            s.param.requires_grad_(True)
        n = self.n_tokens
        try:
            self.tm.zero_grad(set_to_none=True)
            for batch, ref in zip(self._batches(None), self.ref_logp):
                for k in range(len(batch)):
                    r = ref[k].clone()  # out of inference mode, so autograd may keep it
                    logp = torch.log_softmax(self.tm(batch[k : k + 1], use_cache=False).logits[0].float(), dim=-1)
                    ((r.exp() * (r - logp)).sum() / n).backward()
            return {t: s.of(s.param.grad).detach().reshape(s.shape).numpy().copy() for t, s in self.params.items()}
        finally:
            self.tm.zero_grad(set_to_none=True)
            for p, was in before:
                p.requires_grad_(was)

    def _kl_now(self, sequences: int | None = None) -> np.ndarray:
        import torch

        out = []
        for batch, ref in zip(self._batches(sequences), self.ref_logp):
            logp = self._logp(batch)
            ref = ref[: len(batch)]  # the last batch of a prefix may be cut short
            out.append((ref.exp() * (ref - logp)).sum(-1).mean(-1))
        return torch.cat(out).double().numpy()
