"""Benchmark: wall time of the sensitivity tables (every legal type, every tensor) on a model.

    python -m windq.evaluators.bench_tables [--model default] [--group 256] [--repeats 1]

Calibrates once (or reuses --stats DIR), then times `compute_tables` with no cache, reporting
each run and the median. A benchmark, not a test: machines are noisy.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import click


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--stats", type=click.Path(file_okay=False), help="A `windq calibrate` folder to reuse.")
@click.option("--group", default=256, show_default=True, help="Column-chunk width G.")
@click.option("--repeats", default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="Worker threads (default: all cores).")
def main(model: str, stats: str | None, group: int, repeats: int, threads: int | None) -> None:
    from windq.keys import CalibrationFiles
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_model, wiki_text
    from windq.pipeline.calibrate import CalibrationConfig, calibrate, save_calibration
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.sensitivity import compute_tables

    m = GGUFModel(resolve_model(model))
    if stats is None:
        stats = tempfile.mkdtemp(prefix="windq-bench-")
        save_calibration(calibrate(m, wiki_text("calibration"), CalibrationConfig(tokens=4096)), stats)
    im = load_imatrix(os.path.join(stats, CalibrationFiles.IMATRIX), m)
    times, n_entries = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tables = compute_tables(m, im.data, group=group, threads=threads)
        times.append(time.perf_counter() - t0)
        n_entries = sum(len(t.types) for t in tables.tensors.values())
    click.echo(json.dumps({
        "model": m.path.name, "group": group, "cores": os.cpu_count(), "threads": threads or os.cpu_count(),
        "tensors": len(tables.tensors), "tensor_type_pairs": n_entries,
        "seconds": [round(t, 1) for t in times], "median_s": round(statistics.median(times), 1),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
