"""How windq's cost grows with model size: random-weight llama GGUFs (windq's synthetic module,
weight matrices F16 as converted checkpoints are, byte-level vocabulary) of growing width and
depth, each stage run as the CLI in a child process, its wall time and peak anonymous memory
(RssAnon sampled every 10 ms; the memory-mapped GGUF's pages are reclaimable and left out)
recorded, and the exponent of cost against parameter count fitted by least squares on log-log.

    python -m windq.evaluators.scale --sizes 1024x8,2048x8,2048x24,2560x32 --out runs/scale

SIZE is WIDTHxLAYERS (ffn 4× the width, 8 heads); the stages are calibrate --stream on --tokens,
plan at 4.5 bits (tables from --sample-rows rows, knapsack, no verification, no alignment), a
second plan at 5.0 bits (the tables cached: the knapsack alone), export of the 4.5-bit plan, one
PPO episode at 4.5 bits (streamed real loss on the 512 judge tokens: the knapsack's KL, the warm
start, one episode and the policy's plan) and the verification at 5.0 bits against one stock
mix (Q4_K_M's types from llama.cpp's dry run, then the knapsack, the best uniform plan and the
mix each measured by the streamed real loss; the full verification tries 24 mixes, each one
more dry run and, where it fits the budget, one more real-loss measurement).
--stages picks some of them; two depths at one width show what a layer costs:

    python -m windq.evaluators.scale --sizes 1024x8,1024x32 --stages calibrate --out runs/depth
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from windq.evaluators.streaming_memory import measured


def stages(model: Path, work: Path, tokens: int, sample_rows: int) -> dict[str, list[str]]:
    w = [sys.executable, "-m", "windq"]
    stats, plan = work / "stats", work / "plan.json"

    def plan_at(bpw: str, out: Path, *extra: str) -> list[str]:
        verify = [] if "--verify" in extra else ["--no-verify"]
        return w + ["plan", str(model), "--stats", str(stats), "--bpw", bpw, "--align", "none", *verify,
                    "--sample-rows", str(sample_rows), *extra, "--out", str(out)]  # fmt: skip

    return {
        "calibrate --stream": w + ["calibrate", str(model), "--tokens", str(tokens), "--ctx", "256", "--judge-chunks", "2",
                                   "--fisher-chunks", "1", "--stream", "--out", str(stats)],
        f"plan (tables from {sample_rows} rows)": plan_at("4.5", plan),
        "knapsack plan (tables cached)": plan_at("5.0", work / "plan-5.0.json"),  # the first plan's tables, from cache
        "export": w + ["export", str(model), "--plan", str(plan), "--imatrix", str(stats / "imatrix.gguf"),
                       "--gguf", str(work / "out.gguf")],
        # the judge is calibrate's 2 chunks of 256 tokens: PPO and the verification measure all 512
        "ppo (one episode)": plan_at("4.5", work / "plan-ppo.json", "--method", "ppo", "--episodes", "1", "--real-loss-tokens", "512", "--stream"),
        "verify (one mix)": plan_at("5.0", work / "plan-verified.json", "--verify", "--verify-mixes", "Q4_K_M", "--stream"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024x8,2048x8,2048x24,2560x32", help="WIDTHxLAYERS,...: 126M, 0.5B, 1.5B, 3.1B parameters")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--sample-rows", type=int, default=256)
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--stages", default="", help="run only the stages whose names start with one of these (comma-separated), e.g. calibrate")
    ap.add_argument("--fit-from", type=float, default=4e8, help="fit the exponent over the sizes with at least this many parameters (all when fewer than two)")
    args = ap.parse_args(argv)
    from windq.files import atomic_write_text
    from windq.models.gguf_model import GGUFModel
    from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf

    out = Path(args.out)
    wanted = tuple(w for w in args.stages.split(",") if w)
    results = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    for size in args.sizes.split(","):
        width, layers = (int(v) for v in size.split("x"))
        work = out / size
        work.mkdir(parents=True, exist_ok=True)
        model = work / "model.gguf"
        if size not in results:  # a size measured before is kept: the bench resumes
            write_synthetic_gguf(model, SyntheticConfig(n_layer=layers, n_embd=width, n_ff=4 * width, n_head=8, n_head_kv=4, f16=True))
            row = {"params": GGUFModel(model).n_weights, "stages": {}}
            for stage, cmd in stages(model, work, args.tokens, args.sample_rows).items():
                if wanted and not stage.startswith(wanted):
                    continue
                seconds, peak = measured(cmd)
                row["stages"][stage] = {"seconds": round(seconds, 1), "peak_anon_mb": round(peak)}
                print(f"{size} {stage}: {seconds:.1f} s, {peak:.0f} MB", flush=True)
            results[size] = row
            atomic_write_text(out / "scale.json", json.dumps(results, indent=1))  # what a resumed run reads
            model.unlink()  # the models are the biggest thing here
    sizes = sorted(results.values(), key=lambda r: r["params"])
    names = list(sizes[0]["stages"])
    fit = [r for r in sizes if r["params"] >= args.fit_from]
    fit = fit if len(fit) >= 2 else sizes
    span = f"{fit[0]['params'] / 1e6:.0f}M–{fit[-1]['params'] / 1e6:.0f}M"
    print("| stage | " + " | ".join(f"{r['params'] / 1e6:.0f}M: s, MB" for r in sizes) + f" | exponent {span} (time) | (memory) |")
    print("|---|" + "---|" * len(sizes) + "---:|---:|")
    n = np.log([r["params"] for r in fit])
    for st in names:
        t = np.log([r["stages"][st]["seconds"] for r in fit])
        m = np.log([r["stages"][st]["peak_anon_mb"] for r in fit])
        cells = " | ".join(f"{r['stages'][st]['seconds']:.1f}, {r['stages'][st]['peak_anon_mb']}" for r in sizes)
        slopes = [f"{np.polyfit(n, y, 1)[0]:.2f}" if len(fit) >= 2 else "—" for y in (t, m)]  # one size: no slope
        print(f"| {st} | {cells} | {' | '.join(slopes)} |")


if __name__ == "__main__":
    main()
