"""What a plan looks like to a person: an allocation map (layers × tensor kinds, colour = bits per
weight) and a one-screen summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from windq import registry
from windq.files import atomic_output
from windq.models.gguf_model import LAYER_KINDS, kind_name, tensor_kind
from windq.plan import Plan

def _grid(plan: Plan) -> tuple[np.ndarray, list[str], list[str]]:
    """bits per weight [kind, layer], the kinds' names (those of a dense llama layer first, then any
    other kind the plan holds: phi3's fused attn_qkv, an MoE layer's experts; a kind the plan lacks
    has no row), and the tensors outside the layers."""
    blocks = [(n, tensor_kind(n)) for n in plan.tensors if n.startswith("blk.")]
    present = {k for _, k in blocks}
    kinds = [k for k in LAYER_KINDS if k in present] + list(dict.fromkeys(k for _, k in blocks if k is not None and k not in LAYER_KINDS))
    layers = sorted({int(n.split(".")[1]) for n, _ in blocks})
    grid = np.full((len(kinds), max(layers, default=-1) + 1), np.nan)
    for name, kind in blocks:
        if kind in kinds:
            grid[kinds.index(kind), int(name.split(".")[1])] = registry.get(plan.tensors[name]).bits_per_weight
    return grid, [kind_name(k) for k in kinds], [n for n in plan.tensors if not n.startswith("blk.")]


def allocation_map(plan: Plan, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, kinds, others = _grid(plan)
    fig, ax = plt.subplots(figsize=(max(6, grid.shape[1] * 0.32 + 2), 3.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1.5, vmax=8.5, interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds)
    step = max(1, grid.shape[1] // 15)
    ax.set_xticks(range(0, grid.shape[1], step))
    ax.set_xlabel("layer")
    extra = ", ".join(f"{n.removesuffix('.weight')}: {plan.tensors[n]}" for n in others)
    ax.set_title(f"{plan.method} @ {plan.budget_bpw or plan.achieved_bpw:.2f} bpw → {plan.achieved_bpw:.3f} bpw   ({extra})", fontsize=9)
    fig.colorbar(im, ax=ax, label="bits per weight")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def _objective_line(plan: Plan, value: float | None) -> str:
    if value is None:
        return "predicted error: none (the chosen plan uses a type the tables lack)"
    if plan.provenance.get("objective", "proxy") == "kl":
        return f"predicted KL increase (Fisher, tensor plan): {value:.5f} nats per token"
    return f"proxy error (activation-weighted, tensor plan): {value:.6g}"


def candidates_table(plan: Plan) -> list[str]:
    """The verification's candidates, best first, as a table (empty when not verified)."""
    v = plan.provenance.get("verified")
    if not v:
        return []
    width = max(28, *(len(c["label"]) for c in v["candidates"]))  # merged labels ("Q2_K = Q3_K_S") stay aligned
    lines = [f"verified on {v['measured_on']}:", f"  {'candidate':<{width}}  bits/weight   KL (nats/token)   predicted"]
    for c in v["candidates"]:
        pred = "—" if c["predicted"] is None else f"{c['predicted']:.5f}"
        mark = "  ← chosen" if c["label"] == v["chosen"] else ""
        lines.append(f"  {c['label']:<{width}}  {c['bpw']:>11.3f}   {c['kl']:>15.5f}   {pred:>9}{mark}")
    return lines


def summary(plan: Plan, proxy_error: float, chunk_proxy_error: float | None = None, ppo=None) -> list[str]:
    lines = [
        f"method {plan.method} ({plan.granularity}), budget {plan.budget_bpw:g} → achieved {plan.achieved_bpw:.4f} "
        f"bits per weight, {plan.total_bytes / 1e6:.2f} MB of tensor data",
        _objective_line(plan, proxy_error),
    ]
    if chunk_proxy_error is not None:
        lines.append(
            f"chunk plan proxy error: {chunk_proxy_error:.6g} (projection to one type per tensor costs "
            f"{100 * (proxy_error / max(chunk_proxy_error, 1e-30) - 1):.1f} %)"
        )
    if ppo is not None and ppo.kl is not None:
        knap = "" if ppo.knapsack_kl is None else f", knapsack plan {ppo.knapsack_kl:.5f}"
        lines.append(f"PPO: {ppo.episodes} episodes, plan from the {ppo.source}; held-in KL {ppo.kl:.5f}{knap}")
    lines.append("types: " + ", ".join(f"{t}×{n}" for t, n in plan.type_counts().items()))
    sub = plan.provenance.get("importance_substituted")
    if sub:
        lines.append(f"no imatrix data for {', '.join(sub['tensors'])}: their error is weighted by the {sub['by']}")
    grid, kinds, others = _grid(plan)
    for k, row in zip(kinds, grid):
        if not np.isnan(row).all():
            lines.append(f"  {k:<12} mean {np.nanmean(row):.2f} bpw  (min {np.nanmin(row):.2f}, max {np.nanmax(row):.2f})")
    for n in others:
        lines.append(f"  {n.removesuffix('.weight'):<12} {plan.tensors[n]}")
    return lines
