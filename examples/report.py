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


def loss_at(history: list[Row], flops: float) -> float:
    """Val loss of `history` at `flops` training FLOPs, interpolated between evaluations (the last one beyond)."""
    for prev, row in zip(history, history[1:]):
        if row[1] >= flops:
            t = (flops - prev[1]) / (row[1] - prev[1]) if row[1] > prev[1] else 1.0
            return prev[3] + t * (row[3] - prev[3])
    return history[-1][3]


def summary(histories: dict[str, list[Row]], baseline: str = "scratch") -> tuple[float, list[dict]]:
    """The target (the baseline's final val loss) and, per arm, its cost to reach it and the savings in percent."""
    target = histories[baseline][-1][3]
    base = histories[baseline][-1]
    rows = []
    for name, history in histories.items():
        hit = reach(history, target)
        row = {"arm": name, "final_val": history[-1][3], "total_flops": history[-1][1],
               "total_seconds": history[-1][2], "reached": hit is not None,
               "flops_share": 100 * history[-1][1] / base[1], "time_share": 100 * history[-1][2] / max(base[2], 1e-12),
               "scratch_at_equal_flops": loss_at(histories[baseline], history[-1][1])}
        if hit is not None:
            row.update(flops=hit[0], seconds=hit[1], step=hit[2],
                       flops_saving=100 * (1 - hit[0] / base[1]), time_saving=100 * (1 - hit[1] / base[2]))
        else:  # where scratch got to this arm's final loss, as a share of scratch's FLOPs
            own = reach(histories[baseline], history[-1][3])
            row["scratch_share_to_same_loss"] = 100 * own[0] / base[1] if own else None
        rows.append(row)
    return target, rows


def verdict(target: float, r: dict) -> str:
    """One arm against scratch: its savings to scratch's final loss, or else its loss at its own FLOPs and where
    scratch got to that loss (never only "did not reach")."""
    if r["reached"]:
        return (f"{r['arm']}: {r['flops_saving']:.1f}% fewer FLOPs, {r['time_saving']:.1f}% less wall-clock than "
                f"scratch to val loss {target:.4f}")
    share = r.get("scratch_share_to_same_loss")
    where = f"scratch reaches that loss at {share:.0f}%" if share is not None else "scratch never got that high"
    return f"{r['arm']}: val loss {r['final_val']:.4f} at {r['flops_share']:.0f}% of scratch's FLOPs; {where}"


def markdown_table(target: float, rows: list[dict]) -> str:
    lines = [f"Target: scratch's final validation loss {target:.4f}.", "",
             "| arm | final val | FLOPs, share of scratch | wall-clock, share of scratch | scratch's val at the same "
             "FLOPs | reaches target at step | FLOPs saving | wall-clock saving | scratch reaches this arm's final "
             "loss at |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = (f"| {r['arm']} | {r['final_val']:.4f} | {r['flops_share']:.0f}% | {r['time_share']:.0f}% | "
                f"{r['scratch_at_equal_flops']:.4f} | ")
        if r["reached"]:
            lines.append(head + f"{r['step']} | {r['flops_saving']:.1f}% | {r['time_saving']:.1f}% | - |")
        else:
            share = r.get("scratch_share_to_same_loss")
            lines.append(head + f"not reached | - | - | {'-' if share is None else f'{share:.0f}% of its FLOPs'} |")
    return "\n".join(lines)


def headline(target: float, rows: list[dict]) -> str:
    """The run's one line: the growing arm that reaches scratch's final loss with the largest FLOPs saving, with its
    savings; if none reaches it, the growing arm with the lowest final loss, with its loss at its own FLOPs."""
    growing = [r for r in rows if r["arm"] != "scratch"]
    if not growing:
        return f"scratch: val loss {target:.4f}"
    reached = [r for r in growing if r["reached"]]
    best = max(reached, key=lambda r: r["flops_saving"]) if reached else min(growing, key=lambda r: r["final_val"])
    return verdict(target, best)


def plot(histories: dict[str, list[Row]], target: float, path: Path, title: str, wall_clock: bool = True) -> None:
    """Validation loss against FLOPs and (`wall_clock`) against training seconds, side by side (the paper's
    figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = (("training FLOPs", 1), ("training wall-clock (s)", 2))[:2 if wall_clock else 1]
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6 * len(axes_x), 4.5), squeeze=False)
    for name, history in histories.items():
        style = {"lw": 2.2, "color": "black"} if name == "scratch" else {"lw": 1.4}
        for ax, (_, column) in zip(axes[0], axes_x):
            ax.plot([r[column] for r in history], [r[3] for r in history], label=name, **style)
    finals = [h[-1][3] for h in histories.values()]
    for ax, (xlabel, _) in zip(axes[0], axes_x):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (full depth)")
        ax.set_ylim(min(finals) - 0.05, max(finals) + 0.6)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
