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
    def __init__(self, model: GGUFModel, imatrix: Mapping[str, np.ndarray] | None, tokens: np.ndarray):
        import torch

        self.model = model
        self.imatrix = dict(imatrix or {})
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1, tokens.shape[-1]))
        self.tm = load_torch_model(model)
        self._process = weight_processor(model, self.tm)
        self.params = tensor_params(model, self.tm)
        self._bytes: dict[tuple[str, str], np.ndarray] = {}
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
            return torch.log_softmax(self.tm(self.tokens, use_cache=False).logits.float(), dim=-1)

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

        with torch.no_grad():
            for tensor, type_name in types.items():
                w = torch.from_numpy(self._weights(tensor, type_name))
                for p in self.params[tensor]:
                    p.copy_(w.view_as(p))
        logp = self._logp()
        kl = (self.ref_logp.exp() * (self.ref_logp - logp)).sum(-1).mean(-1)
        return kl.double().numpy()
