"""Deployment cards: a versioned JSON Schema, a content digest that exposes edits, and a Markdown rendering.

A card is sealed with the sha256 of its canonical JSON (sorted keys, no whitespace) without the `integrity`
field, so `ligero card validate` catches both a card that breaks the schema and one whose numbers were edited.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from ligero.errors import LigeroError

SCHEMA_PATH = Path(__file__).with_name("deployment-card.schema.json")
SCHEMA_VERSION = "1.0"


@cache
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _digest(card: dict) -> str:
    body = {k: v for k, v in card.items() if k != "integrity"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def seal(card: dict) -> dict:
    """Return the card with its integrity digest set."""
    card = dict(card)
    card["integrity"] = {"algorithm": "sha256-canonical-json", "digest": _digest(card)}
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
    card = seal(card)
    errors = card_errors(card)
    if errors:
        raise RuntimeError(f"generated card {stem} is invalid: {errors[:3]}")
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(card, indent=1, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(card))
    return json_path, md_path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(d: dict | None, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    if not d:
        return "n/a"
    sign = "+" if signed else ""
    return (f"{d['estimate'] * scale:{sign}.{digits}f} [{d['low'] * scale:{sign}.{digits}f}, "
            f"{d['high'] * scale:{sign}.{digits}f}]")


def render_markdown(card: dict) -> str:
    """The card for people: the same content as the JSON, in reading order."""
    i, f, h, m = card["identity"], card["format"], card["hardware"], card["metrics"]
    cap, tox, bias = m["capability"], m["toxicity"], m["bias"]
    g, mon, ab = card["guardrails"], card["monitoring"], card["ab_test_plan"]
    crows = bias["crows_pairs"]
    lines = [
        f"# Deployment card: {i['name']}",
        "",
        f"*Ligero deployment card, schema {card['schema_version']}, run `{i['version']}`, created {i['created']}.*",
        "",
        "## Identity",
        f"- Variant `{i['variant']}` of `{i['base_model']}` (relation: {i['relation']}); license {i['license']}.",
        f"- Base weights: {i['base_source']}" + (f" (sha256 `{i['base_sha256'][:16]}…`)" if i.get("base_sha256") else ""),
        f"- **The published base weights were already quantized: {i['base_published_precision']}.** "
        "\"Full precision\" below means their dequantized fp32 values.",
        "",
        "## Format",
        f"- Scheme `{f['scheme']}`: {_fmt(f['bits_per_weight'], 2)} bits per weight, {_fmt(f['size_mb'], 1)} MB stored.",
        f"- Recipe: `{json.dumps(f['recipe'], sort_keys=True)}`" if f["recipe"] else "- Recipe: none (the base model).",
        ("- Calibration: " + ", ".join(f"{k} {v}" for k, v in f["calibration"].items())) if f["calibration"]
        else "- Calibration: none needed.",
        "- Software: " + ", ".join(f"{k} {v}" for k, v in f["software"].items()),
        "",
        "## Hardware and speed",
        f"- {h['device']}: {h['cpu']}, {h['threads']} threads; runtime {h['runtime']}; batch {h['batch']}, "
        f"max context {h['max_context']}.",
        f"- Decode {_fmt(h['decode_tok_s'], 1)} tok/s (latency per token p50 {_fmt(h['latency_ms_per_token']['p50'], 1)} ms, "
        f"p95 {_fmt(h['latency_ms_per_token']['p95'], 1)} ms); prefill {_fmt(h['prefill_tok_s'], 0)} tok/s.",
        f"- Memory: weights {_fmt(h['memory_mb']['weights'], 1)} MB + KV cache {_fmt(h['memory_mb']['kv_cache'], 1)} MB "
        f"at {h['memory_mb']['context_tokens']} tokens.",
        "",
        "## Metrics against the base model",
        "| metric | value |",
        "|---|---|",
        f"| perplexity (base) | {_fmt(cap['ppl'])} ({_fmt(cap['ppl_base'])}) on {cap['tokens']} tokens |",
        f"| ΔPPL | {cap['delta_ppl_pct']:+.2f} % |",
        f"| mean KL divergence | {_fmt(cap['kld'], 4)} |",
        f"| same top token | {100 * cap['top1_agreement']:.1f} % |",
        f"| CrowS-Pairs pct_stereotype | {_fmt(crows['pct_stereotype'], 1)} % (50 % is unbiased) |",
        f"| Δ pct_stereotype [95 % CI] | {_ci(crows.get('delta_pct_stereotype'), signed=True)} points |",
        f"| CrowS-Pairs items flipped | {_fmt(crows.get('flip_rate', 0.0) * 100, 1)} % (McNemar p = "
        f"{_fmt(crows.get('mcnemar_p'), 3)}) |",
        f"| StereoSet ss / lms / icat | {_fmt(bias['stereoset']['ss'], 1)} / {_fmt(bias['stereoset']['lms'], 1)} / "
        f"{_fmt(bias['stereoset']['icat'], 1)} |",
        f"| expected max toxicity [95 % CI] | {_ci(tox['expected_max_toxicity'], digits=3)} |",
        f"| toxicity probability [95 % CI] | {_ci(tox['toxicity_probability'], digits=3)} |",
        f"| Δ expected max toxicity [95 % CI] | {_ci(tox.get('delta_expected_max_toxicity'), digits=3, signed=True)} |",
        f"| layers flagged for internal shift | {', '.join(map(str, m['internal_shift']['flagged'])) or 'none'} |",
        "",
        f"Toxicity is scored by {tox['classifier']}.",
        "",
        "## Guardrails",
        f"- Output filter: {g['output_filter']['classifier']}, {g['output_filter']['action']} when the score is "
        f"≥ {g['output_filter']['threshold']}.",
        f"- Limits: prompt ≤ {g['max_prompt_tokens']} tokens, ≤ {g['max_new_tokens']} new tokens; banned patterns: "
        f"{len(g['banned_patterns'])}.",
        *([f"- Why: {g['rationale']}"] if g.get("rationale") else []),
        "",
        "## Monitoring plan",
        f"- Reference profile: {mon['reference_profile']['n']} responses to "
        f"{mon['reference_profile']['prompts'].get('description', 'the evaluation prompts')}.",
        "| signal | mean | p50 | p95 |",
        "|---|---|---|---|",
        *[f"| {k} | {_fmt(mon['reference_profile'][k]['mean'])} | {_fmt(mon['reference_profile'][k]['p50'])} | "
          f"{_fmt(mon['reference_profile'][k]['p95'])} |"
          for k in ("output_length", "mean_logprob", "toxicity_score", "prompt_length", "latency_ms")],
        "- Drift tests: " + "; ".join(f"{t['statistic']} warn {t['warn']} / alert {t['alert']}" for t in mon["drift_tests"]),
        *([f"- Schedule: {mon['schedule']}"] if mon.get("schedule") else []),
        "",
        "## A/B test plan",
        f"- {ab['control']} (control) vs {ab['treatment']} (treatment), split {ab['split']}, randomized per "
        f"{ab['unit']} ({ab['assignment']}).",
        f"- Primary metric: {ab['primary_metric']}; guardrail metrics: {', '.join(ab['guardrail_metrics'])}.",
        f"- Minimum detectable effect {ab['minimum_detectable_effect']}: {ab['sample_size_per_arm']} per arm.",
        f"- Analysis: {ab['analysis']}",
        "",
        "## Intended use",
        *[f"- {x}" for x in card["intended_use"]],
        "",
        "## Out of scope",
        *[f"- {x}" for x in card["out_of_scope_use"]],
        "",
        "## Caveats",
        *[f"- {x}" for x in card["caveats"]],
        "",
    ]
    rec = card.get("recommendation")
    if rec:
        lines += ["## Recommendation", f"- {rec.get('summary', '')}", ""]
    lines += [f"Integrity: {card['integrity']['algorithm']} `{card['integrity']['digest']}`", ""]
    return "\n".join(lines)
