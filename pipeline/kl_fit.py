"""The predicted KL, fitted per tensor to the model's measured real loss (objective `kl-fit`).

The tables' predicted KL is a second-order expansion with a diagonal, rank-one Fisher (sensitivity.py):
it misses what correlated errors do (a row's errors against the activations' mean, the cross terms
between columns) and how far from second order a tensor's loss is. Measured on the aligned default
(`evaluators/kl_alone.py`: 30 tensors, each alone at its types nearest 2.1, 3.4 and 4.5 bits, on
1,024 judge tokens), real ÷ predicted runs from 0.6 to 3.6 across tensors (the first layers'
`attn_v`, the embedding and `blk.0.ffn_up` are under-predicted 1.3–3.6×, most later tensors are
within 0.7–1.2×) and less across a tensor's types: scaled by its ratio at the 3.4-bit type, the
spread of the other two types' ratios fell from 0.22 to 0.17 and from 0.32 to 0.15 (standard
deviation of the log).

So each tensor is quantized alone to one probe type and the real KL it causes, KL(source ‖ source
with that tensor quantized), is measured on calibration tokens (never the judge's, which measure the
plans afterwards); the tensor's whole predicted-KL row is scaled by measured ÷ predicted at the
probe. That is the HIGGS linearity model (KL ≈ Σ_l α_l · error_l, α_l measured per layer) with the
Fisher's per-type shape inside each tensor. One forward pass of the fitting tokens per tensor; the
scales are cached in the calibration folder, keyed by the tables, the probe and the tokens.

Measured, it does not pay (README, "A per-tensor fit of the prediction"): on the aligned default at
3.0 and 3.5 bits its optimum's real KL is 1.1 % and 0.9 % worse than `kl`'s, its rank agreement no
better. The ratios move with the text (fitted on calibration chunks against the judge's tokens, the
log ratios correlate 0.79), and what the prediction misses at low bits is mostly interaction: the
3.0-bit optimum's real KL is 1.41× the sum of its tensors' alone, which no per-tensor scale sees.
`kl` stays the default; this objective stays to reproduce that measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from windq import registry
from windq.errors import CalibrationError, InputError
from windq.files import atomic_output
from windq.models.gguf_model import GGUFModel
from windq.pipeline.sensitivity import Tables, TensorTable

FIT_VERSION = 1
PROBE_BPW = 3.5  # each tensor is probed at its legal type nearest this many bits per weight
FIT_SEQUENCES = 2  # calibration sequences measured on (the last chunks of the imatrix's, 256 tokens each)
FIT_TOKENS_PER_SEQUENCE = 256


@dataclass(frozen=True)
class TensorFit:
    probe: str  # the type the tensor was measured at
    predicted: float  # the tables' predicted KL of the tensor alone at the probe, nats per token
    measured: float  # the real KL of the tensor alone at the probe, nats per token

    @property
    def scale(self) -> float:
        """measured ÷ predicted; 1 where the prediction is zero (nothing to scale)."""
        return self.measured / self.predicted if self.predicted > 0 else 1.0


def probe_type(table: TensorTable, source: str) -> str | None:
    """The legal type nearest PROBE_BPW bits per weight that is not the source type (copied: no
    error to measure) and has a non-zero predicted KL; ties go to the smaller type, then by name."""
    n = int(np.prod(table.shape))
    kl = table.objective("kl").sum(axis=1)  # refuses tables without a predicted KL (no Fisher)
    options = [
        (abs(registry.bits_per_weight(int(b), n) - PROBE_BPW), int(b), t)
        for t, b, k in zip(table.types, table.tensor_bytes(), kl)
        if t != source and k > 0
    ]
    return min(options)[2] if options else None


def fit_tokens(tokens: np.ndarray) -> np.ndarray:
    """The sequences fitted on: the first 256 tokens of the last FIT_SEQUENCES calibration chunks
    (the Fisher is estimated on the first chunks; the judge's tokens are never used)."""
    if len(tokens) < FIT_SEQUENCES:
        raise InputError(f"the calibration holds {len(tokens)} chunks; fitting the predicted KL needs {FIT_SEQUENCES}")
    return tokens[-FIT_SEQUENCES:, :FIT_TOKENS_PER_SEQUENCE]


def fit(
    model: GGUFModel,
    tables: Tables,
    imatrix: Mapping[str, np.ndarray] | None,
    tokens: np.ndarray,
    *,
    threads: int | None = None,
    stream: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, TensorFit]:
    """Every tensor of the tables measured alone at its probe type on `tokens` (sequences × length);
    with `stream`, one module's weights in memory at a time (RealLoss)."""
    from windq.pipeline.real_loss import RealLoss

    probes = {n: probe_type(t, model.source_type(n)) for n, t in tables.tensors.items()}
    pairs = [(n, p) for n, p in probes.items() if p is not None]
    judge = RealLoss(model, imatrix, tokens, threads=threads, stream=stream)
    measured = judge.kl_alone(pairs, progress=progress)
    out = {}
    for (n, p), m in zip(pairs, measured):
        t = tables.tensors[n]
        out[n] = TensorFit(p, float(t.kl[t.types.index(p)].sum()), max(float(m), 0.0))
    return out


def apply(tables: Tables, fits: Mapping[str, TensorFit]) -> Tables:
    """The tables with each tensor's predicted KL scaled by its fit, as `kl_fit` (a tensor without a
    probe keeps its prediction)."""
    tensors = {}
    for n, t in tables.tensors.items():
        scale = fits[n].scale if n in fits else 1.0
        tensors[n] = dataclasses.replace(t, kl_fit=t.objective("kl") * scale)
    return dataclasses.replace(tables, tensors=tensors)


def cache_path(statsdir: str | Path, tables: Tables, tokens: np.ndarray) -> Path:
    h = hashlib.sha256()
    h.update(json.dumps([FIT_VERSION, PROBE_BPW, tables.model_sha256, tables.imatrix_sha256, tables.group]).encode())
    for n in sorted(tables.tensors):
        t = tables.tensors[n]
        h.update(n.encode())
        h.update(np.ascontiguousarray(t.kl).tobytes() if t.kl is not None else b"-")
    h.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    return Path(statsdir) / f"kl-fit-{h.hexdigest()[:16]}.json"


def load_or_fit(
    model: GGUFModel,
    statsdir: str | Path,
    tables: Tables,
    imatrix: Mapping[str, np.ndarray] | None,
    *,
    threads: int | None = None,
    stream: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Tables:
    """`tables` with the fitted KL, measured on the calibration folder's tokens or read from its cache."""
    from windq.pipeline.calibrate import load_tokens

    tokens = fit_tokens(load_tokens(statsdir))
    path = cache_path(statsdir, tables, tokens)
    if path.is_file():
        try:  # a calibration folder may have been handed over: its cache is read as data, and checked
            fits = {n: TensorFit(str(f["probe"]), float(f["predicted"]), float(f["measured"])) for n, f in json.loads(path.read_text())["tensors"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CalibrationError(f"{path}: not a kl-fit cache windq wrote ({type(e).__name__}); delete it to measure the fit again") from None
    else:
        fits = fit(model, tables, imatrix, tokens, threads=threads, stream=stream, progress=progress)
        body = {
            "version": FIT_VERSION, "probe_bpw": PROBE_BPW, "tokens": int(tokens.size),
            "tensors": {n: dataclasses.asdict(f) for n, f in fits.items()},
        }  # fmt: skip
        with atomic_output(path) as tmp:
            Path(tmp).write_text(json.dumps(body, indent=1))
    return apply(tables, fits)
