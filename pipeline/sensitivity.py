"""Sensitivity tables: the activation-weighted error of every legal type on every column chunk.

For a weight W (rows × n columns), a type t and the importance m_j of column j (the imatrix),

    error(t, chunk) = Σ_rows Σ_{j in chunk} m_j · (W_ij − q_t(W)_ij)²

and, beside it, the predicted real loss: the increase of KL(reference ‖ plan) per token that the
error alone causes, to second order,

    kl(t, chunk) = ½ Σ_rows Σ_{j in chunk} F_ij · (W_ij − q_t(W)_ij)² ÷ T

with F the weight's diagonal Fisher information per sequence of T tokens (calibrate.py), kept as
row and column marginals, F_ij ≈ r_i c_j / Σr. The Fisher sees what the imatrix cannot: how much
the output distribution cares about each output row, so an `ffn_down` writing into the residual
stream is no longer rated like a `v` projection of the same input size. The planner optimises
`kl`; `error` stays, as the imatrix proxy llama.cpp's tools use, for comparison (`--objective`).

In both, q_t(W) is what the exported file will hold: W quantized by ggml's own `ggml_quantize_chunk`
with the same importance data llama.cpp gets, then decoded by ggml's `to_float`. Two details make
the table bit-exact with the export:
- a tensor already stored as t is copied by llama.cpp, not requantized, so its error is 0;
- whole rows are quantized, as llama.cpp does, and the error is then split by column. ggml's blocks
  run along a row, so a chunk of G columns is G/block blocks of every row; a type is legal on a
  chunk when its block size divides G (and on the tensor when it divides the row). Legacy types
  with an imatrix scale their search by a whole-row statistic, so a chunk's error is its share of
  the whole-row quantization, which is exactly what a one-type-per-tensor GGUF contains.

Row sampling (`sample_rows`, for models whose tables would take hours): ggml quantizes every row
on its own, so a row's error is the same whether or not its neighbours are quantized, and a
tensor's error is a sum over rows that a sample can estimate. Rows are sorted by a cheap predictor
of their error (Σ_j m_j W_ij², times the Fisher's row weight r_i); the few rows at the top are
taken whole, and every k-th of the others from a seeded random start (systematic sampling over
the sorted order, so every stratum of small and large rows is represented), each counting for
k. Bytes are exact whatever the sample. `evaluators/table_sampling.py` measures the estimate against the full computation.

Tables are cached on disk, keyed by model hash, imatrix hash, G, the type list and the sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Mapping

import numpy as np

from windq.errors import InputError
from windq import ggml, registry
from windq.files import atomic_output, load_arrays
from windq.models.gguf_model import GGUFModel, TensorInfo

if TYPE_CHECKING:
    from windq.pipeline.calibrate import FisherStats

TABLE_VERSION = 2  # 2: the predicted KL beside the proxy
GROUPS = (128, 256, 512)  # column-chunk widths offered; None = the whole row
_JOB_WEIGHTS = 1 << 21  # weights per quantization job (a row block)


@dataclass(frozen=True)
class TensorTable:
    name: str
    shape: tuple[int, ...]
    types: tuple[str, ...]  # legal on the tensor, cheapest first
    chunk_cols: np.ndarray  # width of every column chunk
    error: np.ndarray  # [n_types, n_chunks] activation-weighted squared error (the imatrix proxy)
    nbytes: np.ndarray  # [n_types, n_chunks] exact bytes of the chunk in the type
    kl: np.ndarray | None = None  # [n_types, n_chunks] predicted KL increase per token, nats
    kl_fit: np.ndarray | None = None  # `kl` scaled per tensor to its measured real loss (kl_fit.py); not cached here

    def objective(self, name: str) -> np.ndarray:
        """The per-chunk error an allocator minimises: `kl` (predicted real loss), `kl-fit` (the
        same, fitted per tensor to the measured real loss) or `proxy`."""
        if name == "proxy":
            return self.error
        if name == "kl-fit":
            if self.kl_fit is None:
                raise ValueError(f"{self.name}: the fitted KL is made by kl_fit.load_or_fit, not read from the tables' cache")
            return self.kl_fit
        if name == "kl":
            if self.kl is None:
                raise InputError(f"{self.name}: these tables hold no predicted KL (no Fisher in the calibration); use --objective proxy")
            return self.kl
        raise InputError(f"--objective {name}: use kl, kl-fit or proxy")

    @property
    def chunk_legal(self) -> np.ndarray:
        """[n_types, n_chunks]: the type's blocks tile the chunk (always true for whole-row chunks)."""
        blocks = np.array([registry.get(t).block_size for t in self.types])[:, None]
        return (self.chunk_cols[None, :] % blocks) == 0

    def tensor_error(self) -> np.ndarray:
        return self.error.sum(axis=1)

    def tensor_bytes(self) -> np.ndarray:
        return self.nbytes.sum(axis=1)


@dataclass(frozen=True)
class Tables:
    group: int | None
    model_sha256: str
    imatrix_sha256: str | None
    tensors: dict[str, TensorTable]

    def save(self, path: str | Path) -> Path:
        header = {
            "version": TABLE_VERSION, "group": self.group, "model_sha256": self.model_sha256,
            "imatrix_sha256": self.imatrix_sha256,
            "tensors": {n: {"shape": list(t.shape), "types": list(t.types)} for n, t in self.tensors.items()},
        }  # fmt: skip
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        for n, t in self.tensors.items():
            arrays[f"{n}|cols"], arrays[f"{n}|error"], arrays[f"{n}|nbytes"] = t.chunk_cols, t.error, t.nbytes
            if t.kl is not None:
                arrays[f"{n}|kl"] = t.kl
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Tables":
        z = load_arrays(path)
        header = json.loads(z["header"].tobytes())
        tensors = {
            n: TensorTable(n, tuple(h["shape"]), tuple(h["types"]), z[f"{n}|cols"], z[f"{n}|error"], z[f"{n}|nbytes"], z.get(f"{n}|kl"))
            for n, h in header["tensors"].items()
        }
        return cls(header["group"], header["model_sha256"], header["imatrix_sha256"], tensors)


def chunk_widths(n_per_row: int, group: int | None) -> np.ndarray:
    """Column chunks of `group` columns along a row; the last one is shorter when group does not divide it."""
    if group is None or group >= n_per_row:
        return np.array([n_per_row])
    full, rest = divmod(n_per_row, group)
    return np.array([group] * full + ([rest] if rest else []))


def check_group(group: int | None) -> None:
    if group is not None and (group <= 0 or group % 32):
        raise InputError(f"chunk width {group}: use a multiple of 32 (windq offers {', '.join(map(str, GROUPS))}) or the whole row")


def _chunk_bytes(total: int, cols: np.ndarray) -> np.ndarray:
    """A tensor's exact bytes shared out by column; chunk sums are always the tensor's size.

    Where the type's blocks tile the chunk, the share is exactly the chunk's blocks; where they do
    not (a 256-block type on a 128-column chunk), it is the chunk's share of the row's bytes.
    """
    edges = (np.concatenate([[0], np.cumsum(cols)]) * total) // int(cols.sum())
    return np.diff(edges).astype(np.int64)


def _column_error(
    w: np.ndarray, q: np.ndarray, importance: np.ndarray, row_weight: np.ndarray | None, stands_for: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per column: Σ_i s_i d_ij² · m_j (the proxy), and Σ_i s_i r_i d_ij² (the Fisher's row-weighted
    part), s_i the rows a sampled row stands for (1 without sampling)."""
    d = w - q
    if stands_for is None:
        sq = np.einsum("ij,ij->j", d, d, dtype=np.float64)
    else:
        sq = np.einsum("i,ij,ij->j", stands_for, d, d, dtype=np.float64)
        row_weight = None if row_weight is None else row_weight * stands_for
    return sq * importance, None if row_weight is None else np.einsum("i,ij,ij->j", row_weight.astype(np.float64), d, d)


def compute_tables(
    model: GGUFModel,
    imatrix: Mapping[str, np.ndarray] | None,
    *,
    group: int | None = 256,
    allowed: tuple[str, ...] | None = None,
    imatrix_sha256: str | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    only: Collection[str] | None = None,
    fisher: Mapping[str, "FisherStats"] | None = None,
    tokens_per_sequence: int | None = None,
    sample_rows: int | None = None,
) -> Tables:
    """Tables for every quantizable tensor (or the `only` ones) and every legal type (or the `allowed` ones).

    With `fisher` (and the `tokens_per_sequence` it was measured on), the predicted KL too. With
    `sample_rows`, a tensor of more rows than that is estimated from about that many (see above)."""
    check_group(group)
    if sample_rows is not None and sample_rows <= 0:
        raise InputError(f"sample rows {sample_rows}: use a positive number of rows, or none to use them all")
    imatrix = dict(imatrix or {})
    if fisher is not None and not tokens_per_sequence:
        raise ValueError("the Fisher's tokens per sequence are needed to predict a per-token KL")
    # A tensor without importance data (llama-imatrix skips token_embd and output) is quantized
    # without it, as llama.cpp will; its error is weighted by the mean importance of the others,
    # so its scale stays comparable.
    mean_importance = float(np.mean([v.mean() for v in imatrix.values()])) if imatrix else 1.0
    tensors = [t for t in model.quantizable() if only is None or t.name in only]
    # Jobs are (tensor, type, row block, expert): ggml quantizes rows independently, so a big tensor's
    # slow types spread over all cores. Largest tensors go first, so no core idles at the end.
    jobs: list[tuple[TensorInfo, registry.QuantType, int, int, int]] = []
    picked: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tensor → (sampled rows, rows each stands for)
    for t in sorted(tensors, key=lambda t: -t.n_elements):
        rows = t.n_elements // t.n_per_row
        if sample_rows is not None and rows > sample_rows:
            im = imatrix.get(t.name)
            picked[t.name] = sample_row_indices(
                model.dequantized(t.name), im if im is not None else np.ones(t.n_per_row, np.float32),
                None if fisher is None or t.name not in fisher else fisher[t.name].rows, sample_rows,
            )  # fmt: skip
        # a job's rows lie in one expert of an MoE tensor (each expert has its own importance), so
        # block boundaries fall where the experts' rows begin, among the rows computed
        computed = picked[t.name][0] if t.name in picked else np.arange(rows)
        edges = np.searchsorted(computed, np.arange(t.n_mat + 1) * (rows // t.n_mat))
        step = max(1, _JOB_WEIGHTS // t.n_per_row)
        legal = registry.legal_types(
            t.name, t.n_per_row, has_imatrix=t.name in imatrix, zero_padded=model.zero_padded(t.name), allowed=allowed
        )
        for qt in legal:
            for e in range(t.n_mat):
                jobs += [(t, qt, r, min(int(edges[e + 1]), r + step), e) for r in range(int(edges[e]), int(edges[e + 1]), step)]

    lock = threading.Lock()
    cache: dict[str, np.ndarray] = {}
    pending = {t.name: sum(1 for j in jobs if j[0].name == t.name) for t in tensors}

    def weights(t: TensorInfo) -> np.ndarray:
        with lock:
            if t.name not in cache:
                w = model.dequantized(t.name)
                cache[t.name] = w[picked[t.name][0]] if t.name in picked else w
            return cache[t.name]

    def run(job) -> tuple[str, str, np.ndarray]:
        t, qt, r0, r1, expert = job
        w = weights(t)[r0:r1]
        im = imatrix.get(t.name)
        im = None if im is None else im[expert * t.n_per_row : (expert + 1) * t.n_per_row]
        importance = im if im is not None else np.full(t.n_per_row, mean_importance, dtype=np.float32)
        rw = None
        if fisher is not None:
            rw = fisher[t.name].rows[picked[t.name][0]] if t.name in picked else fisher[t.name].rows
            rw = rw[r0:r1]
        stands_for = picked[t.name][1][r0:r1] if t.name in picked else None
        if qt.id == t.type_id:
            # llama.cpp copies a tensor already in the planned type
            col, kcol = np.zeros(t.n_per_row), None if rw is None else np.zeros(t.n_per_row)
        else:
            col, kcol = _column_error(w, ggml.round_trip(qt.id, w, im), importance, rw, stands_for)
        with lock:
            pending[t.name] -= 1
            if pending[t.name] == 0:
                cache.pop(t.name, None)  # no job left for this tensor: free its weights
        return t.name, qt.name, col, kcol

    if fisher is not None:
        missing = [t.name for t in tensors if t.name not in fisher]
        if missing:
            raise InputError(f"the calibration's Fisher lacks {', '.join(missing[:3])}; run `windq calibrate` again")
    results: dict[str, dict[str, np.ndarray]] = {t.name: {} for t in tensors}
    kl_cols: dict[str, dict[str, np.ndarray]] = {t.name: {} for t in tensors}
    # ggml's quantizers and numpy's big loops release the GIL, so threads scale on the cores.
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for done, (name, type_name, col, kcol) in enumerate(pool.map(run, jobs), 1):
            results[name][type_name] = results[name].get(type_name, 0) + col
            if kcol is not None:
                kl_cols[name][type_name] = kl_cols[name].get(type_name, 0) + kcol
            if progress:
                progress(done, len(jobs))

    out = {}
    for t in tensors:
        types = tuple(sorted(results[t.name], key=lambda ty: (registry.get(ty).bits_per_weight, ty)))
        cols = chunk_widths(t.n_per_row, group)
        starts = np.concatenate([[0], np.cumsum(cols)[:-1]])
        error = np.stack([np.add.reduceat(results[t.name][ty], starts) for ty in types])
        nbytes = np.stack([_chunk_bytes(registry.get(ty).nbytes(t.shape), cols) for ty in types])
        kl = None
        if fisher is not None:
            scale = fisher_column_scale(fisher[t.name], tokens_per_sequence)
            kl = np.stack([np.add.reduceat(kl_cols[t.name][ty] * scale, starts) for ty in types])
        out[t.name] = TensorTable(t.name, t.shape, types, cols, error, nbytes, kl)
    return Tables(group, model.sha256, imatrix_sha256, out)


def fisher_column_scale(f: "FisherStats", tokens_per_sequence: int) -> np.ndarray:
    """[n_per_row]: c_j ÷ (2 Σr T), so that Σ_i r_i d_ij² times it, summed over j, is the Fisher's
    second-order KL of the perturbation d (½ Σ r_i c_j d_ij² / Σr per sequence), per token."""
    return f.cols.astype(np.float64) / (2.0 * max(float(f.rows.sum()), 1e-30) * tokens_per_sequence)


def sample_row_indices(w: np.ndarray, importance: np.ndarray, row_weight: np.ndarray | None, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` of `w`'s rows and what each stands for: the rows a few dominate are taken whole (the top
    n/8 by Σ_j m_j W_ij² and, with the Fisher, the top n/8 by that × r_i, whose weights are
    heavy-tailed), the rest systematically from the others sorted by that predictor, each then
    counting for the rows between it and the next. `importance` may hold one row of m_j per expert
    of an MoE tensor (k × n values, `w`'s rows expert after expert): each row is weighed by its own."""
    imp = np.asarray(importance, dtype=np.float64).reshape(-1, w.shape[1])
    by_expert = w.reshape(len(imp), -1, w.shape[1])
    energy = np.einsum("eij,eij,ej->ei", by_expert, by_expert, imp, dtype=np.float64).reshape(-1)
    predictor = energy if row_weight is None else energy * row_weight
    top = max(1, n // 8)
    certain = np.union1d(np.argsort(-energy, kind="stable")[:top], np.argsort(-predictor, kind="stable")[:top])
    rest = np.setdiff1d(np.arange(len(w)), certain)
    m = n - len(certain)
    if m <= 0 or len(rest) <= m:  # nothing left to estimate: every row, each for itself
        return np.arange(len(w)), np.ones(len(w))
    order = rest[np.argsort(predictor[rest], kind="stable")]
    k = len(order) / m
    start = np.random.default_rng(seed).uniform(0, k)
    sampled = order[np.minimum((start + k * np.arange(m)).astype(np.int64), len(order) - 1)]
    rows = np.concatenate([certain, sampled])
    weights = np.concatenate([np.ones(len(certain)), np.full(m, k)])
    keep = np.argsort(rows)
    return rows[keep], weights[keep]


def cache_key(
    model_sha256: str, imatrix_sha256: str | None, group: int | None, allowed: tuple[str, ...] | None, fisher_sha256: str | None = None,
    sample_rows: int | None = None,
) -> str:
    fields = [TABLE_VERSION, model_sha256, imatrix_sha256, group, sorted(allowed) if allowed else None, fisher_sha256]
    if sample_rows is not None:  # full tables keep the key they always had
        fields.append({"sample_rows": sample_rows})
    raw = json.dumps(fields)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cache_path(
    model: GGUFModel, imatrix_sha256: str | None, cache_dir: str | Path, *, group: int | None = 256,
    allowed: tuple[str, ...] | None = None, fisher_sha256: str | None = None, sample_rows: int | None = None,
) -> Path:  # fmt: skip
    key = cache_key(model.sha256, imatrix_sha256, group, allowed, fisher_sha256, sample_rows)
    return Path(cache_dir) / f"sensitivity-{'row' if group is None else f'g{group}'}-{key}.npz"


def load_or_compute(
    model: GGUFModel,
    imatrix: Mapping[str, np.ndarray] | None,
    cache_dir: str | Path,
    *,
    group: int | None = 256,
    allowed: tuple[str, ...] | None = None,
    imatrix_sha256: str | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    fisher: Mapping[str, "FisherStats"] | None = None,
    tokens_per_sequence: int | None = None,
    fisher_sha256: str | None = None,
    sample_rows: int | None = None,
) -> Tables:
    path = cache_path(model, imatrix_sha256, cache_dir, group=group, allowed=allowed, fisher_sha256=fisher_sha256, sample_rows=sample_rows)
    if path.is_file():
        return Tables.load(path)
    tables = compute_tables(
        model, imatrix, group=group, allowed=allowed, imatrix_sha256=imatrix_sha256, threads=threads, progress=progress,
        fisher=fisher, tokens_per_sequence=tokens_per_sequence, sample_rows=sample_rows,
    )  # fmt: skip
    tables.save(path)
    return tables
