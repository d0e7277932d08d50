"""Importance matrices in the GGUF format llama-imatrix writes and llama-quantize reads.

For every weight W that multiplies activations x, the file holds `<W name>.in_sum2` (Σ x_j² over
the calibration tokens, one value per input column j, F32, shape [n_per_row, n_mat]) and
`<W name>.counts` (tokens seen, F32, shape [1, n_mat]), plus the keys imatrix.datasets,
imatrix.chunk_count and imatrix.chunk_size. The importance llama.cpp uses is in_sum2 / counts.
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
    counts: dict[str, int]  # tensor name → tokens seen
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    @property
    def data(self) -> dict[str, np.ndarray]:
        """Per-column importance as llama-quantize computes it from the file: sums / counts. A tensor
        that saw no tokens has no importance to give; it is refused, never replaced by ones."""
        empty = [name for name, c in self.counts.items() if c <= 0]
        if empty:
            raise CalibrationError(
                f"imatrix entry {empty[0]} saw no tokens ({len(empty)} such); calibrate on more text or drop the entry"
            )
        return {name: np.asarray(s, dtype=np.float32) / np.float32(self.counts[name]) for name, s in self.sums.items()}

    def sha256(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.sums):
            h.update(name.encode())
            h.update(np.asarray(self.sums[name], dtype=np.float32).tobytes())
            h.update(str(self.counts[name]).encode())
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
            # numpy shape (n_mat, n_per_row) is ggml's [n_per_row, n_mat]
            w.add_tensor(name + _SUMS, np.asarray(im.sums[name], dtype=np.float32).reshape(1, -1))
            w.add_tensor(name + _COUNTS, np.array([[im.counts[name]]], dtype=np.float32))
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
            c = np.array(t.data, dtype=np.float32).reshape(-1)
            if len(c) != 1:
                raise CalibrationError(f"{path}: {t.name} has {len(c)} experts; windq handles dense models only")
            counts[t.name[: -len(_COUNTS)]] = int(round(float(c[0])))
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
        if len(s) != info.n_per_row:
            raise CalibrationError(
                f"{source} is for another model: {name} has {len(s)} columns there, {info.n_per_row} in {model.path.name}"
            )


def load_imatrix(path: str | Path, model: GGUFModel) -> Imatrix:
    im = read_imatrix(path)
    check_matches(im, model, source=str(path))
    return im
