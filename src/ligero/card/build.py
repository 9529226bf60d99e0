"""Deployment cards from an audit's results: one per variant (and one for the baseline), JSON + Markdown.

The card's frame (identity, format, hardware, policy sections, A/B plan, intended use) is written here; each audit
metric (ligero.eval.metrics) adds its own fields, sample sizes and caveats.
"""

from __future__ import annotations

import math
from pathlib import Path

from scipy.stats import norm

from ligero.card import SCHEMA_VERSION, write_card
from ligero.eval.metrics import CARD_SECTIONS, METRICS
from ligero.eval.variants import AS_SHIPPED, BASELINE
from ligero.io.gguf_export import gguf_file_type
from ligero.models.registry import REGISTRY
from ligero.quant.config import Recipe

DRIFT_TESTS = [
    {"statistic": "psi", "warn": 0.1, "alert": 0.25},  # population stability index: < 0.1 none, > 0.25 major
    {"statistic": "jensen_shannon", "warn": 0.05, "alert": 0.1},
    {"statistic": "ks_p_value", "warn": 0.05, "alert": 0.001},  # alert when p is below
]
FEEDBACK_SCHEMA = {
    "response_id": "id of exactly one response", "name": "e.g. helpfulness", "value": "thumbs up/down (1/0) or score",
    "data_type": "boolean | numeric | categorical", "source": "human | model | code", "comment": "free text",
}
CALIBRATION_TOKENS_PER_WINDOW = 256  # ligero.eval.variants.calibration_windows' default, which the audit uses
POSITIVE_RATE = 0.7  # assumed baseline positive-feedback rate for sizing the A/B test; replace with production data
MIN_EFFECT = 0.05


def sample_size_per_arm(p: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Two-proportion z-test sample size per arm to detect p -> p - mde."""
    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    q = p - mde
    return math.ceil((z_a + z_b) ** 2 * (p * (1 - p) + q * (1 - q)) / mde ** 2)


def _calibration(report: dict, recipe: dict | None) -> dict | None:
    if recipe is None or not Recipe.from_dict(recipe).needs_calibration:
        return None
    split = report["inputs"]["calibration_split"]
    return {"split": split["name"], "sha256": split["sha256"], "windows": report["budget"]["calib_windows"],
            "tokens_per_window": CALIBRATION_TOKENS_PER_WINDOW, "seed": 0}


def _caveats(report: dict, result: dict) -> list[str]:
    source, label = report["source"], report["model_label"]
    caveats = []
    if source["quantized"]:
        caveats.append(f"The published {label} weights were already quantized ({source['precision']}); every "
                       f"comparison is against their dequantized {BASELINE} values, not the original training "
                       "precision.")
    if result["variant"] == AS_SHIPPED:
        caveats.append("This is the published file as stored, computed as llama.cpp's CPU backend computes it "
                       "(each layer's activations rounded to int8 as llama.cpp does for its type: per 32 inputs for "
                       "Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1, per 256 for the K-quants); its speed and memory "
                       "are Ligero's runtime's on that file.")
    sizes = []
    for metric in METRICS:
        caveats += metric.card_caveats(result)
        sizes += metric.sample_sizes(result)
    if sizes:
        caveats.append(f"Sample sizes are finite ({', '.join(sizes)}): read the intervals, not only the point "
                       "estimates.")
    caveats.append("Speed and memory were measured on the machine named under hardware; other CPUs differ.")
    if report.get("quick"):
        caveats.append("This is a --quick run with small samples, for smoke testing only.")
    return caveats


def _gguf(name: str, recipe: dict | None, model_file: dict) -> dict:
    """The llama.cpp file type a card describes (what a deployer downloads or exports), or None and why not."""
    if name == AS_SHIPPED:
        return {"type": model_file.get("file_type"), "note": "the published file itself, as llama.cpp loads it"}
    if recipe is None:
        return {"type": "F32", "note": "full precision (a published quantized file's weights dequantized)"}
    kind, note = gguf_file_type(Recipe.from_dict(recipe))
    return {"type": kind, "note": note}


def _frame(report: dict, name: str, result: dict) -> dict:
    """Everything of a card that is not a metric's."""
    machine, source, recipe = report["machine"], report["source"], result.get("recipe")
    model_file = report["inputs"]["model_file"]
    rec = report["recommendation"]
    relation = {BASELINE: "base", AS_SHIPPED: "as shipped"}.get(name, "quantized")
    if result.get("finetune"):  # a fine-tuning run's model: its base's card is the baseline's
        relation = "fine-tuned" if recipe is None else "fine-tuned, quantized"
    fmt = {"scheme": name, "recipe": recipe, "kv_cache": (recipe or {}).get("kv"),
           "calibration": None if name == AS_SHIPPED else _calibration(report, recipe),
           "software": {k: machine[k] for k in ("ligero", "torch", "python")}}
    fmt["gguf"] = _gguf(name, recipe, model_file)
    if result.get("finetune"):
        fmt["finetune"] = result["finetune"]  # the adapter, its data hashes and the training recipe
    if name == AS_SHIPPED:  # the deployed file itself
        fmt["artifact"] = {"file": Path(model_file["path"]).name, "sha256": model_file["sha256"],
                           "format": model_file.get("format", "gguf"),
                           "tensor_types": model_file.get("tensor_types", []),
                           "arithmetic": "llama.cpp's CPU backend: Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 x int8 activations "
                                         "per 32 (Q8_0 / Q8_1), K-quants x int8 per 256 (Q8_K)"}
    return {
        "schema_version": SCHEMA_VERSION,
        "identity": {
            "name": f"{report['model_label']}-{name}", "variant": name, "version": report["run_id"],
            "base_model": report["model"], "base_source": model_file["path"],
            "hf_base_model": REGISTRY[report["model"]].hf_repo or None if report["model"] in REGISTRY else None,
            "base_sha256": model_file["sha256"], "base_published_precision": source["precision"],
            "relation": relation, "license": source["license"],
            "created": result["created"],
        },
        "format": fmt,
        "hardware": {"device": machine["device"], "cpu": machine["cpu"], "threads": machine["threads"],
                     "runtime": f"ligero (PyTorch CPU, {machine.get('kernels', 'its CPU kernels')})",
                     "max_context": 8192, "batch": 1},
        "metrics": {},
        "guardrails": {"max_prompt_tokens": 2048, "max_new_tokens": 256, "banned_patterns": []},
        "monitoring": {"drift_tests": DRIFT_TESTS, "feedback_schema": FEEDBACK_SCHEMA,
                       "schedule": "run `ligero monitor` hourly from cron; exit code 1 = WARN, 2 = ALERT"},
        "ab_test_plan": {
            "control": BASELINE, "treatment": name, "unit": "user (X-User-Id or the request's user field)",
            "assignment": "sha256(user, experiment) mod 100 against the split: sticky across servers",
            "split": [50, 50], "primary_metric": "positive-feedback rate",
            "guardrail_metrics": ["toxicity score", "output length", "latency p95", "mean token log-prob"],
            "minimum_detectable_effect": MIN_EFFECT,
            "sample_size_per_arm": sample_size_per_arm(POSITIVE_RATE, MIN_EFFECT),
            "segments": ["by X-Segment header or rule"],
            "analysis": ("always-valid (mixture sequential) intervals for the difference, so the test may be watched; "
                         "sample-ratio mismatch by chi-square (p < 0.001 stops the test); Benjamini-Hochberg across "
                         "segments"),
        },
        "intended_use": ["English text completion and chat on CPU where the audited quality, bias and toxicity "
                         "deltas are acceptable", "research on the effects of quantization"],
        "out_of_scope_use": ["decisions about people (hiring, credit, health, law)", "unfiltered public deployment "
                             "without the output filter", "languages other than English (not audited)"],
        "caveats": _caveats(report, result),
        "recommendation": {"summary": rec["summary"], "chosen": rec["chosen"],
                           "this_variant": rec["verdicts"].get(name)},
    }


def card_for(report: dict, name: str, result: dict) -> dict:
    """The (unsealed) card of one variant of an audit: the frame, then every metric's fields."""
    card = _frame(report, name, result)
    row, comparison = report["rows"][name], report["comparisons"].get(name)
    f = report.get("findings")
    if f is not None and name in report["comparisons"]:
        card["findings"] = {"method": f["method"], "q": f["q"], "m": f["m"],
                            "claims": [{k: v for k, v in c.items() if k not in ("variant", "metric", "unit")}
                                       for c in f["claims"] if c["variant"] == name]}
        held = {c["key"]: c["held"] for c in (report.get("replication") or {}).get("claims", [])
                if c["variant"] == name}
        for c in card["findings"]["claims"]:
            if c["key"] in held:
                c["replicated"] = held[c["key"]]  # re-tested on a fresh sample (--replicate)
    for metric in METRICS:
        for section, fields in metric.card_fields(result, row, comparison).items():
            if section not in CARD_SECTIONS:
                raise RuntimeError(f"metric {metric.name} writes card section '{section}', not one of {CARD_SECTIONS}")
            card[section].update(fields)
    return card


def build_cards(report: dict, results: dict, folder: Path) -> list[Path]:
    paths = []
    for name, result in results.items():
        json_path, _ = write_card(card_for(report, name, result), folder, name.replace("+", "_"))
        paths.append(json_path)
    return paths
