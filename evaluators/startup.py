"""Start-up time of the CLI: how long a user waits for `--help` and for a one-line error.

    python -m windq.evaluators.startup [--repeats 5]

Each command runs in a fresh process, `repeats` times; the table gives the median wall time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "windq plan --help": ["plan", "--help"],
    "windq plan default --stats MISSING --bpw 5 --types Q4_K --out x.json (error, exit 2)": [
        "plan", "default", "--stats", "{tmp}/missing", "--bpw", "5", "--types", "Q4_K", "--out", "{tmp}/x.json",
    ],
    "windq plan default --stats MISSING --bpw 5 --types Q9_9 --out x.json (error, exit 2)": [
        "plan", "default", "--stats", "{tmp}/missing", "--bpw", "5", "--types", "Q9_9", "--out", "{tmp}/x.json",
    ],
    "windq export default --plan MISSING --gguf x.gguf (error, exit 2)": [
        "export", "default", "--plan", "{tmp}/missing.json", "--gguf", "{tmp}/x.gguf",
    ],
    "windq eval MISSING.gguf (error, exit 2)": ["eval", "{tmp}/missing.gguf"],
}  # fmt: skip


def measure(repeats: int) -> dict[str, float]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in CASES.items():
            argv = [sys.executable, "-m", "windq", *(a.format(tmp=tmp) for a in args)]
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = subprocess.run(argv, capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                if r.returncode not in (0, 2) or (r.returncode == 2 and len(r.stderr.strip().splitlines()) != 1):
                    raise SystemExit(f"{label}: unexpected result (exit {r.returncode}): {r.stderr}")
            out[label] = statistics.median(times)
    assert not Path(tmp).exists()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print("| command | median wall time (s) |")
    print("|---|---:|")
    for label, sec in measure(a.repeats).items():
        print(f"| `{label}` | {sec:.2f} |")


if __name__ == "__main__":
    main()
