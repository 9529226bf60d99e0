"""Plot helpers for the metrics' report figures (matplotlib without a display)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

BASELINE_COLOR = "black"


def pyplot():
    # matplotlib takes ~0.5 s to import; only report figures need it, not serving or measuring.
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int = 110) -> None:
    """Lay the figure out, write it and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def scatter(rows: Mapping[str, Mapping], baseline: str, x: str, y: str | Callable[[Mapping], float], color: str,
            xlabel: str, ylabel: str, title: str, log_y: bool = False):
    """One labelled point per variant (the baseline in black); `y` is a row key or a function of the row."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    names = list(rows)
    xs = [rows[n][x] for n in names]
    ys = [y(rows[n]) if callable(y) else rows[n][y] for n in names]
    ax.scatter(xs, ys, color=[BASELINE_COLOR if n == baseline else color for n in names])
    for px, py, n in zip(xs, ys, names):
        ax.annotate(n, (px, py), textcoords="offset points", xytext=(4, 3), fontsize=8)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return fig
