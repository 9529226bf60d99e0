"""The full audit of the default model, published under docs/: what `make run` produces, kept in the repository.

    python benchmarks/audit.py [--model smollm2-135m] [--out ligero-out] [--budget standard] [--replicate]
Runs (or resumes) `ligero run`, then writes docs/audit-<model>.md, docs/audit-<model>.json (results.json)
and the figures as PNG under docs/audit-<model>/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ForeignLoad, machine  # noqa: E402
from ligero.card.publish import run_audit  # noqa: E402
from ligero.eval.audit import AS_SHIPPED, BASELINE, DEFAULT_VARIANTS, Audit  # noqa: E402

# What the papers report for these benchmarks, scored as here (a causal LM's likelihoods) for a model of this size.
PUBLISHED = {
    "CrowS-Pairs % stereotype": "masked LMs in the paper (pseudo-likelihood, not comparable): BERT-base 60.5, "
                                "RoBERTa-large 64.1, ALBERT-xxlarge 67.0 (Nangia et al. 2020); 50 = no preference",
    "StereoSet ss": "50 = no preference (Nadeem et al. 2021)",
    "WinoBias % pro-stereotypical pronoun": "none found: the paper scores coreference systems by F1 on pro- vs "
                                            "anti-stereotypical sets, not LM likelihoods; 50 = no gap",
    "BBQ accuracy, ambiguous contexts": "none found for a ~100M causal LM: the paper evaluates fine-tuned "
                                        "multiple-choice QA models (RoBERTa, DeBERTaV3, UnifiedQA); chance 33",
    "BBQ accuracy, disambiguated contexts": "none found (as above); chance 33",
}


def published_values(report: dict) -> str:
    """The baseline's bias numbers beside what the benchmarks' papers report, or the statement that nothing
    comparable was found."""
    base = report["rows"]["fp32"]
    ours = {"CrowS-Pairs % stereotype": base.get("pct_stereotype"), "StereoSet ss": base.get("stereoset_ss"),
            "WinoBias % pro-stereotypical pronoun": base.get("winobias_pct_pro"),
            "BBQ accuracy, ambiguous contexts": base.get("bbq_accuracy_ambiguous"),
            "BBQ accuracy, disambiguated contexts": base.get("bbq_accuracy_disambiguated")}
    lines = ["## The baseline's bias numbers beside published ones", "",
             "| benchmark | this model (fp32 baseline) | published for comparable models |", "|---|---|---|"]
    for key, value in ours.items():
        lines.append(f"| {key} | {'n/a' if value is None else f'{value:.1f}'} | {PUBLISHED[key]} |")
    return "\n".join(["", *lines, ""])


def int8_toxicity(report: dict) -> str:
    """The answer to the question that started issue 17: does int8's toxicity change survive false-discovery control
    and replication? (An earlier run claimed +0.21 [+0.02, +0.42] on 20 prompts x 4 samples.)"""
    claims = [c for c in report["findings"]["claims"] if c["variant"] == "int8" and c["metric"] == "toxicity"]
    if not claims:
        return ""
    held = {c["key"]: c["held"] for c in (report.get("replication") or {}).get("claims", []) if c["variant"] == "int8"}
    lines = ["## int8 and toxicity", "",
             "An earlier full run reported that int8 raised expected maximum toxicity by +0.21 [+0.02, +0.42] on 20 "
             "prompts x 4 samples, with no correction for the ~20 comparisons per variant. In this run:", ""]
    for c in claims:
        if not c["finding"]:
            verdict = "not a finding after Benjamini-Hochberg (so there is nothing to replicate)"
        elif c["key"] in held:
            outcome = "held" if held[c["key"]] else "did NOT hold"
            verdict = f"a finding after Benjamini-Hochberg; on a fresh sample it {outcome}"
        else:
            verdict = "a finding after Benjamini-Hochberg (not re-tested: run with --replicate)"
        lines.append(f"- {c['label']}: {c['delta']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] (uncorrected 95 %), "
                     f"p {c['p_value']:.2g}, q {c['q_value']:.2g}, n {c['n']} prompts; the smallest change this "
                     f"sample detects at 80 % power is {c['detectable']:.3f}: {verdict}.")
    return "\n".join(["", *lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "ligero-out"))
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--variants", help="comma-separated (default: the run's default set)")
    ap.add_argument("--budget", default="standard", choices=["quick", "standard", "thorough"])
    ap.add_argument("--replicate", action="store_true", help="re-test the findings on a fresh sample")
    args = ap.parse_args()
    load = ForeignLoad().start()
    variants = args.variants.split(",") if args.variants else None
    audit = Audit(args.model, variants, out=args.out, budget=args.budget, replicate=args.replicate)
    report = run_audit(audit)
    share = load.share()
    name = f"audit-{args.model.split('-')[0]}"
    docs = Path(args.docs)
    figures = docs / name
    figures.mkdir(parents=True, exist_ok=True)
    for png in (audit.folder / "figures").glob("*.png"):
        shutil.copy(png, figures / png.name)
    per_model = {f.stem: json.loads(f.read_text())["seconds"] for f in (audit.folder / "variants").glob("*.json")
                 if not f.name.endswith(".replicate.json")}  # the run's models; a replication is extra
    seconds = sum(per_model.values())
    default = {n: t for n, t in per_model.items() if n in {BASELINE, AS_SHIPPED, *DEFAULT_VARIANTS}}
    timing = f"measuring the {len(report['variants'])} models took {seconds:.0f} s ({seconds / 60:.1f} min)"
    if len(default) < len(per_model):  # variants beyond the default run: what `ligero run` itself takes
        timing += (f", the default run's {len(default)} of them (`ligero run`) {sum(default.values()):.0f} s "
                   f"({sum(default.values()) / 60:.1f} min)")
    text = (audit.folder / "report.md").read_text().replace("](figures/", f"]({name}/")
    text = text.replace("Generated by `ligero run`", f"Generated by `benchmarks/audit.py` (`ligero run`) at "
                        f"commit `{machine()['commit']}`; {timing}; other processes used {share:.1%} of the "
                        "CPU during the run", 1)
    text += published_values(report) + int8_toxicity(report)
    (docs / f"{name}.md").write_text(text)
    shutil.copy(audit.folder / "results.json", docs / f"{name}.json")
    print(f"wrote {docs / (name + '.md')}")


if __name__ == "__main__":
    main()
