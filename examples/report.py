"""Compare arms of a progressive-training run: when each reaches scratch's final loss, at what cost.

A history is a list of ``(step, flops, seconds, val_loss)`` rows, one per evaluation.
"""

from __future__ import annotations

from pathlib import Path

Row = tuple[int, float, float, float]


def reach(history: list[Row], target: float) -> tuple[float, float, int] | None:
    """``(flops, seconds, step)`` where `history` first gets to `target`, interpolated linearly between the two
    evaluations around the crossing; None if it never does."""
    for prev, row in zip(history, history[1:]):
        if row[3] <= target:
            if prev[3] <= target:
                return prev[1], prev[2], prev[0]
            t = (prev[3] - target) / (prev[3] - row[3])
            flops, seconds = (p + t * (r - p) for p, r in zip(prev[1:3], row[1:3]))
            return flops, seconds, round(prev[0] + t * (row[0] - prev[0]))
    return None


def summary(histories: dict[str, list[Row]], baseline: str = "scratch") -> tuple[float, list[dict]]:
    """The target (the baseline's final val loss) and, per arm, its cost to reach it and the savings in percent."""
    target = histories[baseline][-1][3]
    base = histories[baseline][-1]
    rows = []
    for name, history in histories.items():
        hit = reach(history, target)
        row = {"arm": name, "final_val": history[-1][3], "total_flops": history[-1][1],
               "total_seconds": history[-1][2], "reached": hit is not None}
        if hit is not None:
            row.update(flops=hit[0], seconds=hit[1], step=hit[2],
                       flops_saving=100 * (1 - hit[0] / base[1]), time_saving=100 * (1 - hit[1] / base[2]))
        rows.append(row)
    return target, rows


def markdown_table(target: float, rows: list[dict]) -> str:
    lines = [f"Target: scratch's final validation loss {target:.4f}.", "",
             "| arm | final val | reaches target at step | FLOPs to target | FLOPs saving | seconds to target | "
             "wall-clock saving |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["reached"]:
            lines.append(f"| {r['arm']} | {r['final_val']:.4f} | {r['step']} | {r['flops']:.3g} | "
                         f"{r['flops_saving']:.1f}% | {r['seconds']:.1f} | {r['time_saving']:.1f}% |")
        else:
            lines.append(f"| {r['arm']} | {r['final_val']:.4f} | not reached | - | - | - | - |")
    return "\n".join(lines)


def headline(target: float, rows: list[dict], main: str = "apollo", other: str = "stack") -> str:
    """``apollo: 52.3% fewer FLOPs, 46.0% less wall-clock than scratch to reach val loss 1.92 (stack: ...)``"""
    by = {r["arm"]: r for r in rows}

    def part(r):
        return f"{r['flops_saving']:.1f}% fewer FLOPs" if r["reached"] else "did not reach it"

    m = by[main]
    tail = f" ({other}: {part(by[other])})" if other in by else ""
    if m["reached"]:
        return (f"{main}: {m['flops_saving']:.1f}% fewer FLOPs, {m['time_saving']:.1f}% less wall-clock than scratch "
                f"to reach val loss {target:.4f}{tail}")
    return f"{main}: did not reach scratch's val loss {target:.4f} (ended at {m['final_val']:.4f}){tail}"


def plot(histories: dict[str, list[Row]], target: float, path: Path, title: str) -> None:
    """Validation loss against FLOPs and against wall-clock, side by side (the paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in histories.items():
        style = {"lw": 2.2, "color": "black"} if name == "scratch" else {"lw": 1.4}
        axes[0].plot([r[1] for r in history], [r[3] for r in history], label=name, **style)
        axes[1].plot([r[2] for r in history], [r[3] for r in history], label=name, **style)
    for ax, xlabel in zip(axes, ("training FLOPs", "training wall-clock (s)")):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (full depth)")
        finals = [h[-1][3] for h in histories.values()]
        ax.set_ylim(min(finals) - 0.05, max(finals) + 0.6)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
