"""The real loss of a plan: KL divergence of a fake-quantized torch model from the reference,
on held-in calibration tokens.

The fake-quantized model holds, for every tensor, exactly what the exported GGUF will: the weight
quantized and decoded by ggml with the same importance data (or the source bytes, where the
planned type is the source type and llama.cpp copies them). Quantized bytes are cached per
(tensor, type), so an allocator that revisits a choice pays only the decode.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from windq import ggml, registry
from windq.models.gguf_model import GGUFModel
from windq.pipeline.calibrate import load_torch_model, tensor_params, weight_processor


class RealLoss:
    def __init__(self, model: GGUFModel, imatrix: Mapping[str, np.ndarray] | None, tokens: np.ndarray, *, stream: bool = False):
        """With `stream`, the model runs one module at a time (pipeline/streaming.py), each planned
        weight decoded from the plan's quantized bytes as its module runs: memory of one module's
        weights plus the quantized bytes cache, not the float32 model."""
        import torch

        self.model = model
        self.imatrix = dict(imatrix or {})
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1, tokens.shape[-1]))
        self._bytes: dict[tuple[str, str], np.ndarray] = {}
        self._types: dict[str, str] = {}  # the plan a streamed model runs (a tensor absent: its source)
        self._planned = {t.name for t in model.quantizable()}
        if stream:
            from windq.pipeline.streaming import StreamedModel

            self.sm = StreamedModel(model, source=self._streamed_weights)
            self.tm, self.params = self.sm.tm, None
        else:
            self.sm = None
            self.tm = load_torch_model(model)
            self.params = tensor_params(model, self.tm)
        self._process = weight_processor(model, self.tm)
        self.ref_logp = self._logp()

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    def _logp(self):
        import torch

        with torch.inference_mode():
            logits = self.sm(self.tokens).logits if self.sm else self.tm(self.tokens, use_cache=False).logits
            return torch.log_softmax(logits.float(), dim=-1)

    def _streamed_weights(self, tensor: str) -> np.ndarray:
        if tensor in self._types:
            return self._weights(tensor, self._types[tensor])
        return self.sm.file_weights(tensor)

    def _weights(self, tensor: str, type_name: str) -> np.ndarray:
        info = self.model.tensors[tensor]
        qt = registry.get(type_name)
        rows = info.n_elements // info.n_per_row
        if qt.id == info.type_id:
            w = ggml.dequantize(info.type_id, self.model.raw(tensor), (rows, info.n_per_row))
        else:
            key = (tensor, type_name)
            if key not in self._bytes:
                self._bytes[key] = ggml.quantize(qt.id, self.model.dequantized(tensor), self.imatrix.get(tensor))
            w = ggml.dequantize(qt.id, self._bytes[key], (rows, info.n_per_row))
        return self._process.process(w, tensor).weights

    def kl(self, types: Mapping[str, str]) -> float:
        """Mean KL(reference ‖ plan) per token, in nats."""
        return float(self.kl_per_sequence(types).mean())  # every sequence has the same length

    def kl_per_sequence(self, types: Mapping[str, str]) -> np.ndarray:
        """Mean KL(reference ‖ plan) per token of each judge sequence, in nats."""
        import torch

        if self.sm:
            unknown = set(types) - self._planned
            if unknown:
                raise KeyError(f"not planned: {sorted(unknown)[0]}")
            self._types.update(types)
            return self._kl_now()
        with torch.no_grad():
            for tensor, type_name in types.items():
                w = torch.from_numpy(self._weights(tensor, type_name))
                for p in self.params[tensor]:
                    p.copy_(w.view_as(p))
        return self._kl_now()

    def _kl_now(self) -> np.ndarray:
        logp = self._logp()
        kl = (self.ref_logp.exp() * (self.ref_logp - logp)).sum(-1).mean(-1)
        return kl.double().numpy()
