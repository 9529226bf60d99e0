"""Toxicity of sampled continuations of toxic prompts, and the output filter the card proposes from it."""

from __future__ import annotations

import numpy as np

from ligero.eval import toxicity as tox
from ligero.eval.metrics.base import (
    MeasureContext,
    Metric,
    ReportSection,
    card_interval,
    claim,
    delta_cell,
    interval,
)
from ligero.eval.metrics.plots import BASELINE_COLOR, pyplot
from ligero.eval.variants import BASELINE
from ligero.kernels import MAX_KERNEL_ROWS

CLASSIFIER_NOTE = "word-level TF-IDF + linear SVM; r = 0.57 with Perspective API: a proxy"
INTERVALS = ("expected_max_toxicity", "toxicity_probability", "toxic_fraction")
SHOWN_CHARS = 160  # of a prompt or continuation in the report


class Toxicity(Metric):
    name = "toxicity"
    title = "toxicity"
    # 100 prompts x 2 samples: the paired test gains more from prompts than from samples per prompt
    budget_full = {"toxicity_prompts": 100, "toxicity_samples": 2, "toxicity_tokens": 20}
    budget_quick = {"toxicity_prompts": 4, "toxicity_samples": 2, "toxicity_tokens": 10}
    budget_thorough = {"toxicity_prompts": 400, "toxicity_samples": 4}  # of 993; a replication takes the next 400
    replicable = True

    def load(self) -> None:
        tox.load_scorer()

    def measure(self, ctx: MeasureContext) -> dict:
        b = ctx.budget
        prompts, samples = b["toxicity_prompts"], b["toxicity_samples"]
        # Whole prompts per batch, at most the rows the decode kernels take (more would dequantize every layer).
        with ctx.step(f"toxicity ({prompts} prompts x {samples} samples)", prompts) as advance:
            result = tox.toxicity_eval(ctx.model, ctx.tokenizer, limit=prompts, samples_per_prompt=samples,
                                       max_new_tokens=b["toxicity_tokens"],
                                       batch_size=max(1, MAX_KERNEL_ROWS // samples), progress=advance,
                                       sample=ctx.sample, seed=ctx.sample)  # a replication: other prompts, seed
        return {"toxicity": result.to_dict()}

    def compare(self, base: dict, variant: dict, n_resamples: int) -> dict:
        b, v = tox.ToxicityResult.from_dict(base["toxicity"]), tox.ToxicityResult.from_dict(variant["toxicity"])
        return {"toxicity": tox.compare_toxicity(b, v, n_resamples=n_resamples),
                "most_changed_toxicity": tox.most_changed(b, v, n=3)}

    def claims(self, comparison: dict) -> list[dict]:
        if "toxicity" not in comparison:  # a comparison without this metric's results
            return []
        t = comparison["toxicity"]
        return [claim(self.name, "toxicity.expected_max_toxicity", "expected maximum toxicity", "",
                      t["expected_max_toxicity"]),
                claim(self.name, "toxicity.toxicity_probability", "toxicity probability", "",
                      t["toxicity_probability"])]

    def inputs(self, base: dict) -> dict:
        return {"toxicity_prompts": {"path": base["toxicity"]["data_path"], "sha256": base["toxicity"]["data_sha256"]}}

    def row(self, result: dict, comparison: dict | None) -> dict:
        t = result["toxicity"]
        row = {"expected_max_toxicity": t["expected_max_toxicity"], "toxicity_probability": t["toxicity_probability"]}
        if comparison is not None:
            emt = comparison["toxicity"]["expected_max_toxicity"]
            row.update({"delta_expected_max_toxicity": emt["delta"], "delta_expected_max_toxicity_ci": emt["delta_ci"]})
        return row

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        t = result["toxicity"]
        section = {k: {"estimate": t[k], "low": t[f"{k}_ci"][0], "high": t[f"{k}_ci"][1]} for k in INTERVALS}
        section.update({"classifier": f"{t['scorer']} ({CLASSIFIER_NOTE})", "prompts": t["n_prompts"],
                        "samples_per_prompt": t["samples_per_prompt"]})
        if comparison is not None:
            section["delta_expected_max_toxicity"] = card_interval(comparison["toxicity"]["expected_max_toxicity"])
            section["delta_toxicity_probability"] = card_interval(comparison["toxicity"]["toxicity_probability"])
        guardrails = {
            "toxicity_threshold": tox.TOXIC_THRESHOLD,
            "output_filter": {"classifier": t["scorer"], "threshold": tox.TOXIC_THRESHOLD, "action": "block"},
            "rationale": (f"toxic continuation probability {t['toxicity_probability']:.2f} on toxic prompts: filter "
                          "outputs at the RealToxicityPrompts threshold"),
        }
        return {"metrics": {"toxicity": section}, "guardrails": guardrails}

    def card_schema(self) -> dict[str, dict]:
        unit = {"type": "number", "minimum": 0, "maximum": 1}
        output_filter = {"type": "object", "required": ["classifier", "threshold", "action"],
                         "properties": {"classifier": {"type": "string"}, "threshold": unit,
                                        "action": {"enum": ["block", "redact", "flag"]}}}
        section = {"type": "object", "required": [*INTERVALS, "classifier"]}
        return {"metrics": {"required": ["toxicity"], "properties": {"toxicity": section}},
                "guardrails": {"required": ["toxicity_threshold", "output_filter"],
                               "properties": {"toxicity_threshold": unit, "output_filter": output_filter}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        t = card["metrics"]["toxicity"]
        return {"metrics": [
            f"| expected max toxicity [95 % CI] | {interval(t['expected_max_toxicity'], digits=3)} |",
            f"| toxicity probability [95 % CI] | {interval(t['toxicity_probability'], digits=3)} |",
            f"| Δ expected max toxicity [95 % CI] | {interval(t.get('delta_expected_max_toxicity'), 3, True)} |",
            f"| toxicity classifier | {t['classifier']} |",
        ]}

    def card_caveats(self, result: dict) -> list[str]:
        return [f"Toxicity is scored by a word-level classifier ({result['toxicity']['scorer']}); it misses implicit "
                "toxicity and flags quoted profanity. The prompts are all toxic sentence beginnings "
                "(RealToxicityPrompts style)."]

    def sample_sizes(self, result: dict) -> list[str]:
        return [f"toxicity {result['toxicity']['n_prompts']} prompts"]

    def report_columns(self):
        return [("EMT", lambda r: f"{r['expected_max_toxicity']:.3f}"),
                ("Δ EMT [CI]", lambda r: delta_cell(r, "delta_expected_max_toxicity", digits=3))]

    def report_samples(self, budget) -> str:
        return (f"toxicity {budget['toxicity_prompts']} prompts × {budget['toxicity_samples']} samples of "
                f"{budget['toxicity_tokens']} tokens")

    def report_legend(self, budget) -> str:
        return "EMT: expected maximum toxicity"

    def report_figures(self, report: dict, results: dict):
        return [("toxicity", "Toxicity", _toxicity_figure(results))]

    def report_sections(self, report: dict) -> list[ReportSection]:
        table = [["variant", "prompt", f"{BASELINE} (max score)", "variant (max score)"]]
        for name, cmp in report["comparisons"].items():
            for r in cmp["most_changed_toxicity"]:
                table.append([name, _shown(r["prompt"]), f"{_shown(r['base_continuation'])} ({r['base_max']:.2f})",
                              f"{_shown(r['variant_continuation'])} ({r['variant_max']:.2f})"])
        if len(table) == 1:
            return []
        content_note = ("Content note: the prompts are toxic sentence beginnings and the continuations were sampled "
                        "from them; they may contain offensive, hateful or sexual language, shown as the classifier "
                        "scored them.")
        return [ReportSection("Continuations whose toxicity changed most", table=table,
                              note="Per variant, the prompts whose highest continuation score moved most.",
                              content_note=content_note)]


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return text[:SHOWN_CHARS] + ("…" if len(text) > SHOWN_CHARS else "")


def _toxicity_figure(results: dict):
    names = list(results)
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in [(axes[0], "expected_max_toxicity", "expected maximum toxicity"),
                           (axes[1], "toxicity_probability", "toxicity probability")]:
        est = np.array([results[n]["toxicity"][key] for n in names])
        ci = np.array([results[n]["toxicity"][f"{key}_ci"] for n in names])
        ax.bar(range(len(names)), est, color=[BASELINE_COLOR if n == BASELINE else "tab:red" for n in names],
               alpha=0.7, yerr=[est - ci[:, 0], ci[:, 1] - est], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title + " (95 % CI)", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    return fig
