"""Whole-model against streamed calibration (`windq calibrate` with and without --stream): wall time,
peak anonymous memory (RssAnon sampled from /proc every 10 ms: the memory-mapped GGUF's pages are
reclaimable and left out), and how far the streamed imatrix and Fisher are from the whole-model ones.

    python -m windq.evaluators.streaming_memory default --tokens 4096
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_anon_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):  # the child has just exited: a reaped pid's status is gone
        pass
    return 0.0


def measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RssAnon MB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_anon_mb(proc.pid))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return time.perf_counter() - t0, peak[0]


def max_rel(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max() / max(np.abs(b[k]).max(), 1e-30)) for k in b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a GGUF path or `default`")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from windq.pipeline.calibrate import load_fisher
    from windq.pipeline.imatrix import read_imatrix

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("whole", "stream"):
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "windq", "calibrate", args.model, "--tokens", str(args.tokens),
                   "--threads", str(args.threads), "--out", str(out)] + (["--stream"] if mode == "stream" else [])  # fmt: skip
            rows[mode] = measured(cmd) + (read_imatrix(out / "imatrix.gguf").data, load_fisher(out))
    (tw, mw, iw, fw), (ts, ms, is_, fs) = rows["whole"], rows["stream"]
    fisher_rel = max(max_rel({t: f.rows for t, f in fs.items()}, {t: f.rows for t, f in fw.items()}),
                     max_rel({t: f.cols for t, f in fs.items()}, {t: f.cols for t, f in fw.items()}))  # fmt: skip
    print(f"| calibration of {args.model}, {args.tokens} tokens | wall (s) | peak RssAnon (MB) |")
    print("|---|---:|---:|")
    print(f"| whole model | {tw:.1f} | {mw:.0f} |")
    print(f"| --stream | {ts:.1f} | {ms:.0f} |")
    print(f"\nstreamed ÷ whole: wall {ts / tw:.2f}, memory {ms / mw:.2f}; imatrix max relative difference {max_rel(is_, iw):.1e}, Fisher {fisher_rel:.1e}")


if __name__ == "__main__":
    main()
