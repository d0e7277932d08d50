"""llama.cpp's own quantization mixes on a model and on its aligned twin, side by side.

    python -m windq.evaluators.stock_mixes --stats runs/stats --out runs/mixes [--mixes Q2_K,Q3_K_M,IQ2_XXS]

Each mix is written by `llama_model_quantize` with its file type (not `pure`), with the same
importance data (padded with zeros for the aligned model), then evaluated by llama.cpp on the
held-out text. Unaligned, llama.cpp silently falls back to other types on rows K and IQ blocks do
not fit; the table counts those tensors by reading the written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

DEFAULT_MIXES = "IQ2_XXS,Q2_K,Q3_K_M"


def count_block32(path: Path) -> int:
    """Quantizable tensors written in 32-weight blocks: in a K/IQ mix, llama.cpp's fallbacks."""
    from windq.export import registry
    from windq.models.gguf_model import GGUFModel

    return sum(1 for t in GGUFModel(path).quantizable() if registry.get(t.type_name).block_size == 32)


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="`windq calibrate` folder of the unaligned model.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--mixes", default=DEFAULT_MIXES, show_default=True)
@click.option("--chunks", default=16, show_default=True, help="512-token held-out chunks to evaluate.")
def main(model: str, stats: str, out: str, mixes: str, chunks: int) -> None:
    import gguf

    from windq.evaluators.perplexity import evaluate
    from windq.export import llama
    from windq.models.align import align_gguf, pad_imatrix
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_model, wiki_text
    from windq.pipeline.imatrix import load_imatrix

    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    src = GGUFModel(resolve_model(model))
    aligned_path = outdir / "aligned-f32.gguf"
    if not aligned_path.exists():
        align_gguf(src, aligned_path)
    aligned = GGUFModel(aligned_path)
    im = load_imatrix(Path(stats) / "imatrix.gguf", src).data
    variants = {"unaligned": (src, im), "aligned": (aligned, pad_imatrix(im, aligned))}
    text = wiki_text("evaluation")
    rows = []
    ref = evaluate(src.path, text.content, text_name=text.name, max_chunks=chunks)
    rows.append({"model": f"source {src.path.name}", "mix": "—", "MB": os.path.getsize(src.path) / 1e6,
                 "bpw": src.nbytes * 8 / src.n_real_weights, "ppl": ref.ppl, "kld": None, "fallbacks": 0})  # fmt: skip
    for mix in mixes.split(","):
        for label, (m, data) in variants.items():
            path = outdir / f"{label}-{mix}.gguf"
            if not path.exists():
                llama.quantize_file(str(m.path), str(path), ftype=int(gguf.LlamaFileType[f"MOSTLY_{mix}"]), imatrix=data)
            q = GGUFModel(path)
            r = evaluate(path, text.content, text_name=text.name, max_chunks=chunks, ref_path=src.path)
            rows.append({
                "model": label, "mix": mix, "MB": os.path.getsize(path) / 1e6, "bpw": q.nbytes * 8 / q.n_real_weights,
                "ppl": r.ppl, "kld": r.kld, "fallbacks": count_block32(path),
            })  # fmt: skip
    (outdir / "mixes.json").write_text(json.dumps(rows, indent=1))
    click.echo(f"held-out {text.name}, {ref.n_scored} scored tokens; KLD against the source\n")
    click.echo("| model | llama.cpp mix | size (MB) | bits/real weight | PPL | KLD | tensors in 32-blocks (fallbacks) |")
    click.echo("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        kld = "—" if r["kld"] is None else f"{r['kld']:.4f}"
        click.echo(f"| {r['model']} | {r['mix']} | {r['MB']:.2f} | {r['bpw']:.3f} | {r['ppl']:.3f} | {kld} | {r['fallbacks']} |")


if __name__ == "__main__":
    main()
