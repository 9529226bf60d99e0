"""Deployment cards from an audit's results: one per variant (and one for the baseline), JSON + Markdown."""

from __future__ import annotations

import math
from pathlib import Path

from ligero.card import SCHEMA_VERSION, write_card
from ligero.models.registry import REGISTRY

TOXICITY_THRESHOLD = 0.5  # RealToxicityPrompts' convention, also the output filter's default
DRIFT_TESTS = [
    {"statistic": "psi", "warn": 0.1, "alert": 0.25},  # population stability index: < 0.1 none, > 0.25 major
    {"statistic": "jensen_shannon", "warn": 0.05, "alert": 0.1},
    {"statistic": "ks_p_value", "warn": 0.05, "alert": 0.001},  # alert when p is below
]
FEEDBACK_SCHEMA = {
    "response_id": "id of exactly one response", "name": "e.g. helpfulness", "value": "thumbs up/down (1/0) or score",
    "data_type": "boolean | numeric | categorical", "source": "human | model | code", "comment": "free text",
}


def _ci(cmp: dict) -> dict:
    return {"estimate": cmp["delta"], "low": cmp["delta_ci"][0], "high": cmp["delta_ci"][1]}


def _interval(value: float, ci: list[float]) -> dict:
    return {"estimate": value, "low": ci[0], "high": ci[1]}


def sample_size_per_arm(p: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Two-proportion z-test sample size per arm to detect p -> p - mde."""
    from scipy.stats import norm

    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    q = p - mde
    return math.ceil((z_a + z_b) ** 2 * (p * (1 - p) + q * (1 - q)) / mde ** 2)


def card_for(report: dict, name: str, result: dict) -> dict:
    row = report["rows"][name]
    cmp = report["comparisons"].get(name)
    machine, entry = report["machine"], REGISTRY[report["model"]]
    is_base = cmp is None
    recipe = result.get("recipe")
    calib = None
    if recipe and any(isinstance(c, dict) and c.get("kind") in ("w8a8", "adaround", "lsq")
                      for c in [recipe.get("weights"), recipe.get("head"), recipe.get("embed")]):
        calib = {"split": "wikipedia:calib", "sha256": report["inputs"]["calibration_split"]["sha256"],
                 "windows": report["budget"]["calib_windows"], "tokens_per_window": 256, "seed": 0}
    crows = {"pct_stereotype": row["pct_stereotype"], "n": len(result["crows_pairs"]["ids"])}
    stereo = {"ss": row["stereoset_ss"], "lms": row["stereoset_lms"],
              "icat": row["stereoset_lms"] * min(row["stereoset_ss"], 100 - row["stereoset_ss"]) / 50,
              "n": len(result["stereoset"]["ids"])}
    tox = result["toxicity"]
    toxicity = {
        "expected_max_toxicity": _interval(tox["expected_max_toxicity"], tox["expected_max_toxicity_ci"]),
        "toxicity_probability": _interval(tox["toxicity_probability"], tox["toxicity_probability_ci"]),
        "toxic_fraction": _interval(tox["toxic_fraction"], tox["toxic_fraction_ci"]),
        "classifier": f"{tox['scorer']} (word-level TF-IDF + linear SVM; r = 0.57 with Perspective API: a proxy)",
        "prompts": tox["n_prompts"], "samples_per_prompt": tox["samples_per_prompt"],
    }
    shift = {"layers": [], "flagged": []}
    if not is_base:
        c, s, t = cmp["crows_pairs"], cmp["stereoset"], cmp["toxicity"]
        crows.update({"delta_pct_stereotype": _ci(c["pct_stereotype"]), "flip_rate": c["flips"]["flip_rate"],
                      "mcnemar_p": c["flips"]["mcnemar"]["p_value"],
                      "per_category_delta": {k: _ci(v["pct_stereotype"]) for k, v in c["per_category"].items()}})
        stereo.update({"delta_ss": _ci(s["ss"]), "flip_rate": s["flips"]["flip_rate"]})
        toxicity["delta_expected_max_toxicity"] = _ci(t["expected_max_toxicity"])
        toxicity["delta_toxicity_probability"] = _ci(t["toxicity_probability"])
        layers = result["shift"]["layers"]
        shift = {"layers": [{"layer": x["layer"], "cosine": x["cos_mean"], "flags": x["flags"]} for x in layers],
                 "flagged": row["shift_flagged_layers"], "min_cosine": row["min_layer_cosine"]}
    profile = result["profile"]
    pos_rate = 0.7  # assumed baseline positive-feedback rate for sizing; replace with production data
    mde = 0.05
    verdict = report["recommendation"]["verdicts"].get(name)
    rec = {"summary": report["recommendation"]["summary"], "chosen": report["recommendation"]["chosen"],
           "this_variant": verdict}
    caveats = [
        f"The published {report['model']} weights were already quantized ({entry.notes}); every comparison is "
        "against their dequantized fp32 values, not the original training precision.",
        f"Toxicity is scored by a word-level classifier ({tox['scorer']}); it misses implicit toxicity and flags "
        "quoted profanity. The prompts are all toxic sentence beginnings (RealToxicityPrompts style).",
        f"Sample sizes are finite (CrowS-Pairs {crows['n']}, StereoSet {stereo['n']}, toxicity {tox['n_prompts']} "
        "prompts): read the intervals, not only the point estimates.",
        "Speed and memory were measured on the machine named under hardware; other CPUs differ.",
    ]
    if report.get("quick"):
        caveats.append("This is a --quick run with small samples, for smoke testing only.")
    return {
        "schema_version": SCHEMA_VERSION,
        "identity": {
            "name": f"{report['model']}-{name}", "variant": name, "version": report["run_id"],
            "base_model": report["model"], "base_source": report["inputs"]["model_file"]["path"],
            "base_sha256": report["inputs"]["model_file"]["sha256"], "base_published_precision": entry.notes,
            "relation": "base" if is_base else "quantized", "license": entry.license, "created": result["created"],
        },
        "format": {
            "scheme": name, "recipe": recipe, "bits_per_weight": row["bits_per_weight"], "size_mb": row["size_mb"],
            "kv_cache": (recipe or {}).get("kv"), "calibration": calib,
            "software": {"ligero": machine["ligero"], "torch": machine["torch"], "python": machine["python"]},
        },
        "hardware": {
            "device": machine["device"], "cpu": machine["cpu"], "threads": machine["threads"],
            "runtime": "ligero (PyTorch CPU + its AVX-512 kernels)", "max_context": 8192, "batch": 1,
            "decode_tok_s": row["decode_tok_s"], "prefill_tok_s": row["prefill_tok_s"],
            "latency_ms_per_token": {k: result["latency_ms_per_token"][k] for k in ("p50", "p95")},
            "memory_mb": result["memory_mb"],
        },
        "metrics": {
            "capability": {**{k: result["capability"][k] for k in ("ppl", "ppl_base", "delta_ppl_pct", "kld",
                                                                  "top1_agreement", "tokens")},
                           "eval_sha256": result["capability"]["eval_sha256"]},
            "bias": {"crows_pairs": crows, "stereoset": stereo},
            "toxicity": toxicity,
            "internal_shift": shift,
        },
        "guardrails": {
            "toxicity_threshold": TOXICITY_THRESHOLD,
            "output_filter": {"classifier": tox["scorer"], "threshold": TOXICITY_THRESHOLD, "action": "block"},
            "max_prompt_tokens": 2048, "max_new_tokens": 256, "banned_patterns": [],
            "rationale": (f"toxic continuation probability {toxicity['toxicity_probability']['estimate']:.2f} on toxic "
                          "prompts: filter outputs at the RealToxicityPrompts threshold"),
        },
        "monitoring": {
            "reference_profile": profile, "drift_tests": DRIFT_TESTS, "feedback_schema": FEEDBACK_SCHEMA,
            "schedule": "run `ligero monitor` hourly from cron; exit code 1 = WARN, 2 = ALERT",
        },
        "ab_test_plan": {
            "control": "fp32", "treatment": name, "unit": "user (X-User-Id or the request's user field)",
            "assignment": "sha256(user, experiment) mod 100 against the split: sticky across servers",
            "split": [50, 50], "primary_metric": "positive-feedback rate",
            "guardrail_metrics": ["toxicity score", "output length", "latency p95", "mean token log-prob"],
            "minimum_detectable_effect": mde, "sample_size_per_arm": sample_size_per_arm(pos_rate, mde),
            "segments": ["by X-Segment header or rule"],
            "analysis": ("always-valid (mixture sequential) intervals for the difference, so the test may be watched; "
                         "sample-ratio mismatch by chi-square (p < 0.001 stops the test); Benjamini-Hochberg across "
                         "segments"),
        },
        "intended_use": ["English text completion and chat on CPU where the audited quality, bias and toxicity "
                         "deltas are acceptable", "research on the effects of quantization"],
        "out_of_scope_use": ["decisions about people (hiring, credit, health, law)", "unfiltered public deployment "
                             "without the output filter", "languages other than English (not audited)"],
        "caveats": caveats,
        "recommendation": rec,
    }


def build_cards(report: dict, results: dict, folder: Path) -> list[Path]:
    paths = []
    for name, result in results.items():
        json_path, _ = write_card(card_for(report, name, result), folder, name.replace("+", "_"))
        paths.append(json_path)
    return paths
