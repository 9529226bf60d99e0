"""Expert routing (MoE models only): how often a variant sends tokens to other experts than the baseline, and how
far each expert's output moves on the baseline's inputs. A dense model adds nothing to any table or card."""

from __future__ import annotations

import numpy as np

from ligero.eval.metrics.base import MeasureContext, Metric, ReportSection, budget_windows
from ligero.eval.metrics.plots import pyplot
from ligero.eval.routing import baseline_routing, moe_layers, routing_comparison


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


class Routing(Metric):
    name = "routing"
    title = "expert routing"
    budget_full = {"routing_windows": 2, "routing_tokens": 256}
    budget_quick = {"routing_windows": 1, "routing_tokens": 64}

    @staticmethod
    def windows(ctx: MeasureContext) -> list[list[int]]:
        return budget_windows(ctx, "routing_windows", "routing_tokens")

    def prepare(self, ctx: MeasureContext) -> None:
        if not moe_layers(ctx.model):
            return
        windows = self.windows(ctx)
        with ctx.step("baseline expert routing", len(windows)) as advance:
            ctx.shared["baseline_routing"] = baseline_routing(ctx.model, windows, progress=advance)

    def measure(self, ctx: MeasureContext) -> dict:
        base = ctx.shared.get("baseline_routing")
        if base is None or ctx.is_baseline:
            return {"routing": None}
        windows = self.windows(ctx)
        with ctx.step(f"expert routing ({len(windows)} windows)", len(windows)) as advance:
            return {"routing": routing_comparison(base, ctx.model, windows, progress=advance)}

    def row(self, result: dict, comparison: dict | None) -> dict:
        routing = result.get("routing")
        if comparison is None or not routing:
            return {}
        worst = routing["worst_expert"]
        return {"routing_same_experts": routing["same_experts"], "routing_same_top1": routing["same_top1"],
                "worst_expert_rel_error": worst["rel_error"] if worst else None}

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        routing = result.get("routing")
        if comparison is None or not routing:
            return {}
        return {"metrics": {"expert_routing": {
            "tokens": routing["tokens"], "moe_layers": len(routing["layers"]),
            "experts_per_token": routing["experts_per_token"], "same_experts": routing["same_experts"],
            "overlap": routing["overlap"], "same_top1": routing["same_top1"],
            "worst_expert": routing["worst_expert"],
            "layers": [{k: x[k] for k in ("layer", "same_experts", "overlap", "same_top1")} for x in routing["layers"]],
        }}}

    def card_schema(self) -> dict[str, dict]:
        share = {"type": "number", "minimum": 0, "maximum": 1}
        return {"metrics": {"properties": {"expert_routing": {
            "type": "object", "required": ["tokens", "moe_layers", "same_experts", "overlap", "same_top1", "layers"],
            "properties": {"tokens": {"type": "integer", "minimum": 1}, "moe_layers": {"type": "integer", "minimum": 1},
                           "same_experts": share, "overlap": share, "same_top1": share,
                           "layers": {"type": "array"}}}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        routing = card["metrics"].get("expert_routing")
        if not routing:
            return {}
        worst = routing.get("worst_expert")
        lines = [f"| tokens routed to the baseline's experts | {_pct(routing['same_experts'])} of "
                 f"{routing['tokens']} tokens × {routing['moe_layers']} MoE layers (same first choice: "
                 f"{_pct(routing['same_top1'])}) |"]
        if worst:
            lines.append(f"| most shifted expert (on the baseline's inputs) | layer {worst['layer']}, expert "
                         f"{worst['expert']}: relative error {worst['rel_error']:.3f} |")
        return {"metrics": lines}

    def sample_sizes(self, result: dict) -> list[str]:
        routing = result.get("routing")
        return [f"expert routing {routing['tokens']} tokens × {len(routing['layers'])} MoE layers"] if routing else []

    def report_columns(self):
        return [("same experts", lambda r: _pct(r["routing_same_experts"]) if "routing_same_experts" in r else ""),
                ("worst expert err", lambda r: f"{r['worst_expert_rel_error']:.3f}"
                 if r.get("worst_expert_rel_error") is not None else "")]

    def report_sections(self, report: dict) -> list[ReportSection]:
        rows = {n: r for n, r in report["rows"].items() if "routing_same_experts" in r}
        if not rows:
            return []
        table = [["variant", "same experts", "same first choice", "worst expert relative error"]]
        table += [[n, _pct(r["routing_same_experts"]), _pct(r["routing_same_top1"]),
                   f"{r['worst_expert_rel_error']:.3f}" if r["worst_expert_rel_error"] is not None else "n/a"]
                  for n, r in rows.items()]
        budget = report["budget"]
        return [ReportSection(
            "Expert routing", table=table,
            note=(f"Routing on {budget['routing_windows']} × {budget['routing_tokens']} tokens of the evaluation "
                  "split, through each model's own hidden states: a token counts as 'same experts' in a layer when "
                  "the variant chooses exactly the baseline's experts there (shares over tokens × MoE layers). The "
                  "expert error runs each variant expert on the inputs the baseline routed to it: ‖y - y_base‖ / "
                  "‖y_base‖, the largest over all experts. Routing flips are discontinuous: a few changed choices "
                  "move the output more than the weights' rounding error does."))]

    def report_figures(self, report: dict, results: dict):
        names = [n for n, r in results.items() if r.get("routing")]
        return [("expert_shift", "Per-expert relative error", _expert_figure(results, names))] if names else []


def _expert_figure(results: dict, names: list[str]):
    """Per variant, a layers × experts grid of each expert's relative output error on the baseline's inputs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        layers = results[name]["routing"]["layers"]
        grid = np.array([[np.nan if e is None else e for e in x["expert_rel_error"]] for x in layers], dtype=float)
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [str(x["layer"]) for x in layers])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("Expert output error on the baseline's routed inputs (blank: no token routed)")
    fig.tight_layout()
    return fig
