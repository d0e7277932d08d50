"""Importance matrices in the GGUF format llama-imatrix writes and llama-quantize reads.

For every weight W that multiplies activations x, the file holds `<W name>.in_sum2` (Σ x_j² over
the calibration tokens, one value per input column j, F32, shape [n_per_row, n_mat]) and
`<W name>.counts` (tokens seen, F32, shape [1, n_mat]), plus the keys imatrix.datasets,
imatrix.chunk_count and imatrix.chunk_size. The importance llama.cpp uses is in_sum2 / counts.

n_mat is 1 for a dense weight and the number of experts for an MoE tensor (3-D, experts along
ggml's third dimension): each expert has its own sums, over the tokens routed to it, and its own
count. windq keeps an entry's sums flat, expert after expert (k × n_per_row values: the layout
llama.cpp's quantizer takes), and its count as an int, or one per expert.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
import gguf
import numpy as np

from windq.errors import CalibrationError, InputError
from windq.files import atomic_output
from windq.models.gguf_model import GGUFModel

_SUMS, _COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # tensor name → Σx² per input column, float64 while accumulating
    counts: dict[str, int | np.ndarray]  # tensor name → tokens seen (an MoE tensor's: one per expert)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    @property
    def data(self) -> dict[str, np.ndarray]:
        """Per-column importance as llama-quantize computes it from the file: sums / counts. A tensor
        that saw no tokens has no importance to give; it is refused, never replaced by ones."""
        empty = [name for name, c in self.counts.items() if np.any(np.asarray(c) <= 0)]
        if empty:
            which = "" if np.ndim(self.counts[empty[0]]) == 0 else f"'s expert {int(np.argmin(self.counts[empty[0]]))}"
            raise CalibrationError(
                f"imatrix entry {empty[0]}{which} saw no tokens ({len(empty)} such entries); calibrate on more text or drop the entry"
            )
        out = {}
        for name, s in self.sums.items():
            c = np.asarray(self.counts[name], dtype=np.float32).reshape(-1, 1)  # one row per expert
            out[name] = (np.asarray(s, dtype=np.float32).reshape(len(c), -1) / c).reshape(-1)
        return out

    def sha256(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.sums):
            h.update(name.encode())
            h.update(np.asarray(self.sums[name], dtype=np.float32).tobytes())
            c = self.counts[name]
            h.update(str(c).encode() if np.ndim(c) == 0 else np.asarray(c, dtype=np.float32).tobytes())
        return h.hexdigest()


def save_imatrix(im: Imatrix, path: str | Path, architecture: str = "llama") -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), architecture)
        w.add_type("imatrix")
        w.add_array(gguf.Keys.IMatrix.DATASETS, list(im.datasets))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, im.chunk_count)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, im.chunk_size)
        for name in sorted(im.sums):
            # numpy shape (n_mat, n_per_row) is ggml's [n_per_row, n_mat]; counts (n_mat, 1) is [1, n_mat]
            c = np.asarray(im.counts[name], dtype=np.float32).reshape(-1, 1)
            w.add_tensor(name + _SUMS, np.asarray(im.sums[name], dtype=np.float32).reshape(len(c), -1))
            w.add_tensor(name + _COUNTS, c)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_imatrix(path: str | Path) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{path}: not a GGUF imatrix (legacy .dat files: convert them with llama-imatrix --output-format gguf)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises bare ValueError/struct/index errors on a damaged file
        raise InputError(f"{path}: unreadable imatrix GGUF ({type(e).__name__}: {e})") from None
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(_SUMS):
            sums[t.name[: -len(_SUMS)]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(_COUNTS):
            c = np.rint(np.array(t.data, dtype=np.float32).reshape(-1)).astype(np.int64)
            counts[t.name[: -len(_COUNTS)]] = int(c[0]) if len(c) == 1 else c
    if not sums or set(sums) != set(counts):
        raise InputError(f"{path}: not an imatrix (no matching .in_sum2/.counts tensors)")

    def field_value(key, default):
        f = reader.get_field(key)
        return default if f is None else f.contents()

    return Imatrix(
        sums=sums,
        counts=counts,
        datasets=list(field_value(gguf.Keys.IMatrix.DATASETS, [])),
        chunk_count=int(field_value(gguf.Keys.IMatrix.CHUNK_COUNT, 0)),
        chunk_size=int(field_value(gguf.Keys.IMatrix.CHUNK_SIZE, 0)),
    )


def check_matches(im: Imatrix, model: GGUFModel, source: str = "imatrix") -> None:
    """An imatrix made for another model names tensors this one lacks or has other row lengths."""
    for name, s in im.sums.items():
        info = model.tensors.get(name)
        if info is None:
            raise CalibrationError(f"{source} is for another model: {model.path.name} has no tensor {name}")
        # one count for all experts is an older llama-imatrix's MoE entry, which llama.cpp broadcasts
        experts = np.size(im.counts[name])
        if len(s) != info.n_per_row * info.n_mat or experts not in (1, info.n_mat):
            have = f"{len(s)} columns" if experts == 1 else f"{experts} experts of {len(s) // experts} columns"
            want = f"{info.n_per_row}" if info.n_mat == 1 else f"{info.n_mat} experts of {info.n_per_row}"
            raise CalibrationError(f"{source} is for another model: {name} has {have} there, {want} in {model.path.name}")


def load_imatrix(path: str | Path, model: GGUFModel) -> Imatrix:
    im = read_imatrix(path)
    check_matches(im, model, source=str(path))
    return im
