"""Internal shift: per-layer hidden states of a variant against the baseline's on the same tokens."""

from __future__ import annotations

import numpy as np

from ligero.eval.metrics.base import MeasureContext, Metric, budget_windows
from ligero.eval.metrics.plots import pyplot
from ligero.eval.shift import ShiftResult, baseline_hidden, internal_shift
from ligero.eval.variants import BASELINE


class Shift(Metric):
    name = "shift"
    title = "internal shift"
    budget_full = {"shift_windows": 2, "shift_tokens": 256}
    budget_quick = {"shift_windows": 1, "shift_tokens": 64}

    @staticmethod
    def windows(ctx: MeasureContext) -> list[list[int]]:
        return budget_windows(ctx, "shift_windows", "shift_tokens")

    def prepare(self, ctx: MeasureContext) -> None:
        windows = self.windows(ctx)
        with ctx.step("baseline hidden states", len(windows)) as advance:
            ctx.shared["baseline_hidden"] = baseline_hidden(ctx.base_model, windows, progress=advance)

    def measure(self, ctx: MeasureContext) -> dict:
        if ctx.is_baseline:
            return {"shift": None}
        windows = self.windows(ctx)
        with ctx.step(f"internal shift ({len(windows)} windows)", len(windows)) as advance:
            return {"shift": internal_shift(ctx.shared["baseline_hidden"], ctx.model, windows,
                                            progress=advance).to_dict()}

    def row(self, result: dict, comparison: dict | None) -> dict:
        if comparison is None:
            return {}
        shift = result.get("shift")
        return {"shift_flagged_layers": ShiftResult.from_dict(shift).flagged if shift else [],
                "min_layer_cosine": min(layer["cos_mean"] for layer in shift["layers"]) if shift else 1.0}

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        shift = {"layers": [], "flagged": []}
        if comparison is not None:
            shift = {"layers": [{"layer": x["layer"], "cosine": x["cos_mean"], "flags": x["flags"]}
                                for x in result["shift"]["layers"]],
                     "flagged": row["shift_flagged_layers"], "min_cosine": row["min_layer_cosine"]}
        return {"metrics": {"internal_shift": shift}}

    def card_schema(self) -> dict[str, dict]:
        return {"metrics": {"required": ["internal_shift"],
                            "properties": {"internal_shift": {"type": "object", "required": ["layers", "flagged"]}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        flagged = card["metrics"]["internal_shift"]["flagged"]
        return {"metrics": [f"| layers flagged for internal shift | {', '.join(map(str, flagged)) or 'none'} |"]}

    def report_columns(self):
        return [("flagged layers", lambda r: ", ".join(map(str, r.get("shift_flagged_layers", []))))]

    def report_samples(self, budget) -> str:
        return f"internal shift on {budget['shift_windows']} × {budget['shift_tokens']} tokens"

    def report_figures(self, report: dict, results: dict):
        names = [n for n, r in results.items() if r.get("shift")]
        return [("shift_heatmap", "Internal shift per layer", _shift_figure(results, names))] if names else []


def _shift_figure(results: dict, names: list[str]):
    """1 - cosine similarity of each layer's hidden states to the baseline's (log colour scale)."""
    from matplotlib.colors import LogNorm  # with pyplot: only when a report is drawn

    plt = pyplot()
    grid = np.array([[max(1 - x["cos_mean"], 1e-7) for x in results[n]["shift"]["layers"]] for n in names])
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(names) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=1e-5, vmax=1))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("layer (0 = embeddings, i = output of block i - 1)")
    ax.set_title(f"Internal shift: 1 - cosine(hidden states, {BASELINE})  (× = flagged)")
    for i, n in enumerate(names):
        for x in results[n]["shift"]["layers"]:
            if x["flags"]:
                ax.text(x["layer"], i, "×", ha="center", va="center", fontsize=7, color="cyan")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return fig
