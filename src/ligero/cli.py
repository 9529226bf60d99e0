"""`ligero` command line: plain functions behind argparse; user errors end in one line and exit code 2."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from ligero import __version__
from ligero.errors import LigeroError
from ligero.models.registry import DEFAULT_MODEL


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _count(text: str) -> int:
    """A whole number >= 0."""
    return _whole_number(text, 0)


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _add_scheme_args(p: argparse.ArgumentParser, required: bool = False,
                     help: str = "quantize on the fly first") -> None:
    p.add_argument("--scheme", required=required, help=f"quantization scheme, e.g. int8, int4, b158; {help}")
    p.add_argument("--group-size", type=int, help="group size for group-wise schemes (32, 64, 128, 256)")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows of 256 tokens (SmoothQuant)")
    p.add_argument("--calib-text", help="UTF-8 file to calibrate on (default: the calibration split)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry id (see `ligero models`), a .gguf file, or a Hugging Face / Ligero folder")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")


def cmd_models(args) -> int:
    from ligero.io.gguf_header import read_gguf_header  # headers only: no torch, so listing takes a blink
    from ligero.models.registry import REGISTRY

    rows = []
    for entry in REGISTRY.values():
        row = {"id": entry.id, "description": entry.description, "license": entry.license, "notes": entry.notes}
        try:
            path = entry.locate()
            cfg = read_gguf_header(path).config()
            row.update(architecture=cfg.arch, parameters=cfg.n_params(), layers=cfg.n_layers,
                       size_mb=round(path.stat().st_size / 1e6, 1), path=str(path))
        except LigeroError as exc:
            row.update(error=str(exc))
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        if "error" in r:
            print(f"{r['id']:<14} unavailable: {r['error']}")
        else:
            print(f"{r['id']:<14} {r['architecture']:<7} {r['parameters'] / 1e6:6.1f}M params  "
                  f"{r['layers']:>2} layers  {r['size_mb']:7.1f} MB on disk  {r['description']}")
    return 0


def _load(args):
    """Load --model; with --scheme, quantize it on the fly (the scheme is validated before loading)."""
    from ligero.eval.variants import build_variant

    return build_variant(args.model, args.scheme, group_size=args.group_size, device=args.device,
                         **_calibration_options(args))


def _calibration_options(args) -> dict:
    """build_variant's calibration settings from --calib-windows and --calib-text (used when the scheme needs them)."""
    from ligero.eval.data import load_text

    text = load_text(args.calib_text).text if args.calib_text else None
    return {"calib_windows": args.calib_windows, "calib_text": text}


def cmd_generate(args) -> int:
    from ligero.models.generate import SamplingConfig, generate

    if args.image:
        return _generate_with_images(args)
    if args.adapter:
        raise LigeroError("--adapter is the vision model's adapter: give it with --image FILE")
    key = None
    if args.watermark:
        from ligero.watermark import Watermarker, load_key

        key = load_key(args.watermark)  # a bad key fails before the model loads
    loaded = _load(args)
    if loaded.tokenizer is None:
        raise LigeroError(f"{args.model} has no tokenizer (tokenizer.json); add one to generate text")
    marker = None
    if key is not None:
        key.check_tokenizer(loaded.tokenizer, args.model, f"the watermark key {args.watermark}")
        marker = Watermarker(key, loaded.model.cfg.vocab_size)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed, logits_processor=marker)
    prompt = args.prompt
    add_bos = None
    if args.chat:
        prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        add_bos = False  # templates carry their own BOS when they want one
    result = generate(loaded.model, loaded.tokenizer, [prompt], args.max_new_tokens, sampling,
                      stop_strings=args.stop, add_bos=add_bos,
                      on_text=lambda _i, delta: print(delta, end="", flush=True))
    print()
    if args.verbose:
        print(f"[{len(result.tokens[0])} tokens, finish: {result.finish_reasons[0]}]", file=sys.stderr)
    if marker is not None:
        print(f"[watermarked with key {marker.key_id}]", file=sys.stderr)
    return 0


def _generate_with_images(args) -> int:
    """`ligero generate --image FILE "question"`: the vision-language model (the shipped adapter, or --adapter)."""
    from ligero.models.generate import SamplingConfig
    from ligero.vision.images import DEFAULT_LIMITS, read_image
    from ligero.vision.pretrained import load_vision_model

    if args.watermark or args.scheme:
        raise LigeroError("--image works with the full-precision vision model only: drop --watermark / --scheme")
    if len(args.image) > DEFAULT_LIMITS.max_images:
        raise LigeroError(f"{len(args.image)} images given; at most {DEFAULT_LIMITS.max_images} per prompt")
    images = [read_image(path) for path in args.image]  # a bad image fails before the model loads
    vlm = load_vision_model(args.adapter, device="cpu" if args.device == "auto" else args.device)
    base = vlm.adapter_meta["base_model"]["id"]
    if args.model not in (DEFAULT_MODEL, base):
        raise LigeroError(f"the vision adapter is trained for {base}, not {args.model}: drop --model")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    text = vlm.answer([args.prompt], [images], args.max_new_tokens, sampling,
                      on_text=lambda delta: print(delta, end="", flush=True))[0]
    print()
    if args.verbose:
        print(f"[{len(images)} images, {len(text)} characters]", file=sys.stderr)
    return 0


def cmd_watermark_keygen(args) -> int:
    from ligero.io.checkpoint import load_tokenizer
    from ligero.watermark import WatermarkSettings, new_key, save_key

    base = WatermarkSettings.preset(args.preset, args.gamma, args.delta)
    overrides = {k: v for k, v in (("context_width", args.context_width), ("seeding", args.seeding)) if v is not None}
    if args.self_hash:
        overrides["self_hash"] = True
    settings = WatermarkSettings(**{**base.__dict__, **overrides})
    if Path(args.out).exists():
        raise LigeroError(f"{args.out} already exists; a new key would orphan what the old one marked: choose "
                          "another path or delete the old key first")
    key = new_key(settings, load_tokenizer(args.model), args.model)
    save_key(key, args.out)
    print(f"wrote {args.out}: key {key.key_id}, {settings.describe()}, for the tokenizer of {args.model}. Keep it "
          "secret: whoever holds it can detect and forge the watermark.")
    return 0


def cmd_watermark_detect(args) -> int:
    from ligero.io.checkpoint import load_tokenizer
    from ligero.watermark import Detector, load_key

    key = load_key(args.key)
    model = args.model or key.model
    if args.file == "-":
        text = sys.stdin.read()
    else:
        from ligero.eval.data import text_file

        text = text_file(args.file, "`ligero watermark detect` (or - for standard input)").text
    tokenizer = load_tokenizer(model)
    key.check_tokenizer(tokenizer, model, f"the watermark key {args.key}")
    detection = Detector(key, z_threshold=args.z_threshold, min_scored=args.min_tokens).detect(
        tokenizer.encode(text, add_bos=False))
    print(json.dumps(detection.to_dict(), indent=1) if args.json else detection.summary())
    return 0 if detection.watermarked else 1


def cmd_eval(args) -> int:
    if args.what != "quality":
        loaded = _load(args)
    out: dict = {"model": args.model, "scheme": args.scheme}
    if args.what == "ppl":
        from ligero.eval.data import load_text
        from ligero.eval.perplexity import make_windows, perplexity, window_bos
        from ligero.progress import progress_bar

        if loaded.tokenizer is None:
            raise LigeroError(f"{args.model} has no tokenizer; perplexity needs one")
        text = load_text(args.text)
        ids = loaded.tokenizer.encode(text.text)
        windows = len(make_windows(ids, args.ctx, args.max_tokens, bos=window_bos(loaded.tokenizer)))
        with progress_bar(f"perplexity ({windows} windows of {args.ctx})", windows) as advance:
            res = perplexity(loaded.model, loaded.tokenizer, ids, ctx=args.ctx, max_tokens=args.max_tokens,
                             progress=advance)
        out.update(text=text.describe(), **res.summary())
        human = (f"{args.model}: PPL {res.ppl:.3f}  mean NLL {res.mean_nll:.4f}  bits/byte {res.bits_per_byte:.4f}  "
                 f"({res.tokens} tokens in {res.windows} windows of {res.ctx}; text {text.name} "
                 f"sha256 {text.sha256[:12]})")
    elif args.what == "quality":
        from ligero.eval.data import load_text
        from ligero.eval.perplexity import make_windows, window_bos
        from ligero.eval.quality import compare_models
        from ligero.progress import progress_bar

        base, quant, base_spec = _load_quantized(args)
        text = load_text(args.text)
        ids = base.tokenizer.encode(text.text)
        bos = window_bos(base.tokenizer)
        windows = len(make_windows(ids, args.ctx, args.max_tokens, bos=bos))
        with progress_bar(f"quality against {base_spec} ({windows} windows)", windows) as advance:
            res = compare_models(base.model, quant.model, ids, ctx=args.ctx, max_tokens=args.max_tokens, bos=bos,
                                 progress=advance)
        out.update(base=base_spec, recipe=quant.model.quant_recipe.to_dict(), text=text.describe(), **res.summary())
        human = (f"{args.model} [{quant.model.quant_recipe.name or 'saved'}] vs {base_spec}: PPL {res.ppl:.3f} vs "
                 f"{res.ppl_base:.3f} ({res.delta_ppl_pct:+.2f} %), KLD {res.kld:.5f}, same top token "
                 f"{100 * res.top1_agreement:.1f} %, {res.bits_per_weight:.2f} bits/weight, {res.size_mb:.1f} MB "
                 f"(base {res.base_size_mb:.1f} MB); {res.tokens} tokens, text sha256 {text.sha256[:12]}")
    else:
        from ligero.eval.speed import measure_speed, speed_runs
        from ligero.progress import progress_bar

        with progress_bar("speed (prefill and decode runs)", speed_runs(args.repeats)) as advance:
            res = measure_speed(loaded.model, prefill_tokens=args.ctx, decode_tokens=args.decode_tokens,
                                repeats=args.repeats, progress=advance)
        out.update(res.summary())
        human = (f"{args.model}: prefill {res.prefill_tok_s:.1f} tok/s ({res.prefill_tokens} tokens), "
                 f"decode {res.decode_tok_s:.1f} tok/s (batch 1, {res.decode_tokens} tokens), median of "
                 f"{args.repeats}; weights {res.weight_bytes / 1e6:.1f} MB, peak RSS {res.peak_rss_mb:.0f} MB, "
                 f"{res.threads} threads on {res.device}")
    print(json.dumps(out, indent=1) if args.json else human)
    return 0


def _load_quantized(args):
    """(base, quantized, base spec): --model DIR of a saved quantized model, or --model M --scheme S."""
    from ligero.eval.variants import BASELINE
    from ligero.io.checkpoint import load_model

    if args.scheme == BASELINE:
        raise LigeroError(f"eval quality compares a quantized model with {BASELINE}; pass a quantizing --scheme")
    quant = _load(args)
    if args.scheme is not None:
        return load_model(args.model, args.device), quant, args.model
    if getattr(quant.model, "quant_recipe", None) is None:
        raise LigeroError(f"{args.model} is not a quantized model; pass --scheme to quantize it on the fly")
    base_spec = quant.info.get("source", {}).get("base")
    if not base_spec:
        raise LigeroError(f"{args.model} does not record its base model; re-create it with `ligero quantize`")
    return load_model(base_spec, args.device), quant, base_spec


def cmd_quantize(args) -> int:
    from ligero.eval.variants import build_variant
    from ligero.io.checkpoint import save_checkpoint
    from ligero.quant.config import recipe_for

    recipe = recipe_for(args.scheme, args.group_size)  # the baseline is no quantization: not accepted here
    calibration = _calibration_options(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise LigeroError(f"{out} exists and is not empty; choose another --out or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LigeroError(f"cannot create {out} ({exc.strerror}); choose a writable --out") from None
    loaded = build_variant(args.model, recipe=recipe, device=args.device, **calibration)
    seconds = loaded.info["quantize_seconds"]
    source = {"base": args.model, "base_source": loaded.info.get("source", {}), "quantize_seconds": seconds}
    save_checkpoint(loaded.model, loaded.tokenizer, out, source)
    from ligero.eval.quality import bits_per_weight
    from ligero.models.transformer import stored_bytes

    print(f"{args.model} -> {out}: scheme {recipe.name}, {bits_per_weight(loaded.model):.2f} bits/weight, "
          f"{stored_bytes(loaded.model) / 1e6:.1f} MB ({seconds:.1f} s)")
    return 0


def _source_gguf(info: dict) -> Path | None:
    """The GGUF file a loaded model (or the base it was quantized from) came from, when it still exists."""
    source = info.get("source", {})
    for candidate in (source, source.get("base_source", {})):
        path = candidate.get("path") if isinstance(candidate, dict) else None
        if path and str(path).endswith(".gguf") and Path(path).is_file():
            return Path(path)
    return None


def cmd_export(args) -> int:
    from ligero.eval.variants import build_variant
    from ligero.io.checkpoint import load_model
    from ligero.io.gguf_export import export_gguf, gguf_recipe
    from ligero.quant.config import recipe_for

    out = Path(args.out)
    if out.exists() and not args.force:
        raise LigeroError(f"{out} exists; choose another --out or pass --force")
    if not out.parent.is_dir():
        raise LigeroError(f"{out.parent} is not a folder; create it or choose another --out")
    if args.scheme:  # quantized from the full-precision model, like `ligero quantize`
        recipe = gguf_recipe(recipe_for(args.scheme, args.group_size))  # checked before any quantization
        loaded = build_variant(args.model, recipe=recipe, device="cpu", **_calibration_options(args))
    else:  # as loaded: a GGUF's Q8_0 / Q4_0 / Q4_1 tensors as they are, a Ligero folder's packed layers
        loaded = load_model(args.model, device="cpu", keep_quantized=True)
    source = _source_gguf(loaded.info)
    if source is None:
        raise LigeroError(f"{args.model} does not come from a GGUF file Ligero can still read, so there is no GGUF "
                          "metadata (tokenizer, chat template) to write; export models loaded from GGUF files")
    written = export_gguf(loaded.model, source, out, float16=args.float16)
    types = ", ".join(f"{n} {t}" for t, n in sorted(written["tensor_types"].items()))
    print(f"{args.model} -> {out}: GGUF, tensors {types}, {out.stat().st_size / 1e6:.1f} MB")
    return 0


def _add_audit_command(sub) -> None:
    from ligero.eval.budgets import DEFAULT_VARIANTS

    p = sub.add_parser("audit", help="the same audit for another model or set of variants")
    p.add_argument("--model", help=f"registry id (see `ligero models`; default {DEFAULT_MODEL}, or the adapter's "
                                   "base), a .gguf file, a Hugging Face folder or a saved Ligero folder; a quantized "
                                   "file is also audited as shipped (variant 'as-shipped')")
    p.add_argument("--variants", help="comma-separated schemes (default: " + ",".join(DEFAULT_VARIANTS) + "; with "
                                      "--adapter: ft,ft+q4_0 and ft+ the scheme the base was trained in); "
                                      "as-shipped is added for a quantized source")
    p.add_argument("--adapter", metavar="DIR", help="a `ligero finetune` run folder: audit the base (baseline), the "
                                                    "fine-tuned model (variant ft) and it quantized (ft+<scheme>)")
    _add_audit_args(p)
    p.set_defaults(func=cmd_audit)


def _add_finetune_command(sub) -> None:
    from ligero.lab.domains import ALL_TARGETS, DOMAINS

    p = sub.add_parser("finetune", help="train LoRA adapters for a domain on a frozen base (QLoRA with --scheme nf4)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base: registry id, .gguf file or model folder")
    p.add_argument("--scheme", help="hold the base quantized while training (QLoRA: nf4, or int4); default fp32")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--domain", choices=list(DOMAINS), help="a built-in domain: " + "; ".join(
        f"{k}: {v[2]}" for k, v in DOMAINS.items()))
    data.add_argument("--data", metavar="FILE", help="UTF-8 text (documents separated by blank lines) or JSONL "
                                                     "(text / document, prompt + response, or messages per line)")
    p.add_argument("--out", required=True, help="run folder: adapter, curve, checkpoints (a rerun resumes)")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha: the update is scaled by alpha / rank")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapters' input (default 0.05)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated layers to adapt (default all: {','.join(ALL_TARGETS)})")
    p.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch", type=_positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4; cosine, 5 %% warm-up)")
    p.add_argument("--eval-every", type=_positive_int, default=50, help="held-out loss every N steps")
    p.add_argument("--checkpoint-every", type=_positive_int, default=25, help="checkpoint every N steps")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, more time)")
    p.add_argument("--merge", action="store_true", help="also write the base with the adapters merged (OUT/merged)")
    p.add_argument("--seed", type=int, default=0, help="seeds the batches, dropout and the adapters' start")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from ligero.lab.finetune import LoRAPlan, finetune
    from ligero.lab.trainer import TrainConfig

    plan = LoRAPlan(args.rank, args.alpha, args.dropout, tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    tc = TrainConfig(steps=args.steps, batch_rows=args.batch, seq_len=args.seq_len, lr=args.lr,
                     warmup_steps=min(max(1, args.steps // 20), args.steps - 1), weight_decay=0.0,
                     eval_every=args.eval_every, eval_tokens=8192, checkpoint_every=args.checkpoint_every,
                     seed=args.seed)
    finetune(args.model, args.domain or args.data, args.out, args.scheme, plan, tc, args.gradient_checkpointing,
             args.merge, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def _audit(args, model_id: str | None, variants: list[str] | None, adapter: str | None = None) -> int:
    from ligero.card.publish import run_audit
    from ligero.card.report import recommendation_lines
    from ligero.eval.audit import Audit, Thresholds

    if args.quick and args.budget not in (None, "quick"):
        raise LigeroError(f"--quick and --budget {args.budget} disagree; give one of them")
    thresholds = Thresholds(args.max_ppl_increase, args.max_bias_shift, args.min_decode_tps)
    audit = Audit(model_id, variants, quick=args.quick, thresholds=thresholds, out=args.out, run_id=args.run_id,
                  fresh=args.fresh, replicate=args.replicate, budget=args.budget, adapter=adapter)
    report = run_audit(audit)
    print("\n".join(recommendation_lines(report)))
    print(f"report: {audit.folder / 'report.html'}  results: {audit.folder / 'results.json'}  cards: "
          f"{audit.folder / 'cards'}")
    return 0


def cmd_run(args) -> int:
    return _audit(args, DEFAULT_MODEL, None)


def cmd_audit(args) -> int:
    variants = args.variants.split(",") if args.variants else None
    return _audit(args, args.model, variants, args.adapter)


def cmd_card(args) -> int:
    from ligero.card import SCHEMA_VERSION, card_errors, read_card

    card = read_card(args.file)
    errors = card_errors(card)
    if len(errors) == 1:
        raise LigeroError(f"{args.file} is not a valid deployment card: {errors[0]}")
    if errors:
        for e in errors:
            print(f"{args.file}: {e}", file=sys.stderr)
        print(f"ligero: error: {args.file} is not a valid deployment card ({len(errors)} problem(s) above)",
              file=sys.stderr)
        return 2
    checked = "digest checked"
    if args.key:
        from ligero.card.signing import load_public_key, verify_card

        key = load_public_key(args.key)
        try:
            verify_card(card, key, args.key)
        except LigeroError as exc:
            raise LigeroError(f"{args.file}: {exc}") from None
        checked += f", signature checked with {args.key}"
    elif card["integrity"].get("signature"):
        checked += "; signed, but no --key given to check the signature"
    print(f"{args.file}: valid deployment card (schema {SCHEMA_VERSION}, {checked})")
    return 0


def cmd_card_keygen(args) -> int:
    from ligero.card.signing import generate_keys

    private, public = generate_keys(args.out)
    print(f"private key: {private} (readable by you only; sign with it, never share it)\n"
          f"public key: {public} (give it to whoever checks your cards)")
    return 0


def cmd_card_sign(args) -> int:
    from ligero.card import read_card, save_card
    from ligero.card.signing import load_private_key, sign_card

    card, key = read_card(args.file), load_private_key(args.key)
    try:
        signed = sign_card(card, key)
    except LigeroError as exc:
        raise LigeroError(f"{args.file}: {exc}") from None
    try:
        json_path, md_path = save_card(signed, Path(args.file))
    except OSError as exc:
        raise LigeroError(f"cannot write {args.file} ({exc.strerror}); sign a copy in a writable folder") from None
    print(f"{json_path}: signed (ed25519, public key {signed['integrity']['signature']['public_key']}); "
          f"{md_path} rewritten")
    return 0


def cmd_card_schema(args) -> int:
    from ligero.card import load_schema

    print(json.dumps(load_schema(), indent=1, ensure_ascii=False))
    return 0


def cmd_card_profile(args) -> int:
    from ligero.card.profile import reprofile_card

    path = reprofile_card(args.file, args.prompts, args.out, args.device)
    print(f"{path}: reference profile of {args.prompts} responses, card re-sealed (unsigned: sign it again with "
          "`ligero card sign` if it was signed)")
    return 0


# Modules of the `serve` extra (pip install 'ligero[serve]'); psycopg is checked by the store, for PostgreSQL only.
SERVE_EXTRA_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "prometheus_client", "yaml")


def _require_serve_extra(command: str) -> None:
    """One line instead of an import traceback when the serve extra is not installed."""
    missing = [m for m in SERVE_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise LigeroError(f"`ligero {command}` needs the serve extra ({', '.join(missing)} not installed); "
                          "run `pip install 'ligero[serve]'`")


def cmd_monitor(args) -> int:
    _require_serve_extra("monitor")
    from ligero.serve.abtest import parse_split
    from ligero.serve.monitor import monitor, summary_line

    planned = None
    if args.split:
        names, shares = args.variants.split(",") if args.variants else [], parse_split(args.split)
        if len(names) != len(shares):
            raise LigeroError("--split needs --variants with as many names, e.g. --variants fp32,int4 --split 50,50")
        planned = dict(zip(names, shares))
    result = monitor(args.store, args.card, since=args.since, out_dir=Path(args.out), planned_split=planned)
    print(summary_line(result, Path(args.out)))
    return result["exit_code"]  # 0 OK, 1 WARN, 2 ALERT, 3 nothing to judge (for cron)


def cmd_serve(args) -> int:
    _require_serve_extra("serve")
    from ligero.serve.abtest import parse_segment_rule, parse_split
    from ligero.serve.server import build_config, serve

    if not 0 < args.port < 65536:
        raise LigeroError(f"--port must be between 1 and 65535, got {args.port}")
    model = args.model
    if model is None and args.card:  # the card's own base model (a registry id or the audited file's path)
        from ligero.card import read_card

        model = read_card(args.card)["identity"]["base_model"]
    cfg = build_config(model or DEFAULT_MODEL, args.variant or [],
                       split=parse_split(args.split) if args.split else None,
                       store_url=args.store, card=args.card, guardrails_file=args.guardrails,
                       api_keys_file=args.api_keys_file,
                       segment_rules=[parse_segment_rule(r) for r in args.segment_rule],
                       experiment=args.experiment, max_batch=args.max_batch, max_waiting=args.max_waiting,
                       prefill_chunk=args.prefill_chunk, kv_cache=args.kv_cache,
                       stream_interval_ms=args.stream_interval, keep_text=args.keep_text,
                       device=args.device, public_metrics=args.public_metrics, body_timeout_s=args.body_timeout,
                       watermark_file=args.watermark, vision=args.vision is not None,
                       vision_adapter=None if args.vision in (None, "shipped") else args.vision)
    return serve(cfg, args.host, args.port)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch and Ligero's kernels (default: torch's choice, one per core)")


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    from ligero.eval.budgets import BUDGETS

    p.add_argument("--budget", choices=list(BUDGETS), default=None,
                   help="sample sizes: " + "; ".join(f"{k}: {v}" for k, v in BUDGETS.items()) + " (default standard)")
    p.add_argument("--quick", action="store_true", help="short for --budget quick")
    p.add_argument("--out", default="ligero-out", help="output folder (a run goes to OUT/<run-id>/)")
    p.add_argument("--run-id", help="name of the run folder (default: model, mode and settings hash)")
    p.add_argument("--fresh", action="store_true", help="measure every variant again instead of reusing results")
    p.add_argument("--replicate", action="store_true",
                   help="re-test every finding on a fresh sample (other CrowS-Pairs / StereoSet items and toxicity "
                        "prompts, another seed) and report whether it held")
    p.add_argument("--max-ppl-increase", type=float, default=5.0, help="recommendation: max ΔPPL %% (default 5)")
    p.add_argument("--max-bias-shift", type=float, default=5.0,
                   help="recommendation: max |Δ pct_stereotype| and |Δ StereoSet ss|, points (default 5)")
    p.add_argument("--min-decode-tps", type=float, default=None,
                   help="recommendation: min decode tok/s (default: the baseline's measured speed)")
    _add_threads_arg(p)


def _add_card_commands(sub) -> None:
    """`ligero card validate | keygen | sign | schema | profile`."""
    card_sub = sub.add_parser("card", help="deployment cards").add_subparsers(dest="card_command", required=True)
    v = card_sub.add_parser("validate", help="check a card against the schema and its digest (and its signature)")
    v.add_argument("file", help="the card: cards/<variant>.json")
    v.add_argument("--key", help="the signer's public key (KEY.pub): also check the card's Ed25519 signature")
    v.set_defaults(func=cmd_card)
    v = card_sub.add_parser("keygen", help="create an Ed25519 key pair for signing cards: KEY (private) and KEY.pub")
    v.add_argument("--out", required=True, help="path of the private key; the public key goes to OUT.pub")
    v.set_defaults(func=cmd_card_keygen)
    v = card_sub.add_parser("sign", help="sign a valid card with a private key (rewrites the card and its .md)")
    v.add_argument("file", help="the card to sign: cards/<variant>.json")
    v.add_argument("--key", required=True, help="private key from `ligero card keygen`")
    v.set_defaults(func=cmd_card_sign)
    v = card_sub.add_parser("schema", help="print the complete JSON Schema of deployment cards")
    v.set_defaults(func=cmd_card_schema)
    v = card_sub.add_parser("profile", help="measure a larger reference profile for a card (for PSI / JS drift)")
    v.add_argument("file", help="the card: cards/<variant>.json")
    v.add_argument("--prompts", type=_positive_int, default=200, help="profile requests (default 200)")
    v.add_argument("--out", help="folder for the new card (default: overwrite the card in place)")
    v.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    v.set_defaults(func=cmd_card_profile)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API with guardrails, A/B tests and a store")
    p.add_argument("--model", help=f"registry id or path (default: the --card's base model, else {DEFAULT_MODEL})")
    p.add_argument("--variant", action="append", metavar="NAME=SCHEME",
                   help="a served variant: NAME=SCHEME (quantized on the fly), NAME=FOLDER (saved by `ligero "
                        "quantize`) or SCHEME; repeat for an A/B test (default: the card's variant, else fp32)")
    p.add_argument("--split", help="A/B shares per variant in percent, e.g. 50,50 (default: equal)")
    p.add_argument("--experiment", help="A/B experiment name (default: <model>-ab); it seeds the assignment hash")
    p.add_argument("--segment-rule", action="append", default=[], metavar="SEGMENT=re:PATTERN|bucket:LO-HI",
                   help="put users in a segment by id (the X-Segment header wins), e.g. staff=re:^emp-")
    p.add_argument("--store", help="store URL: sqlite:///file.db (default sqlite:///ligero-serve.db) or "
                                   "postgresql+psycopg://user:password@host/db")
    p.add_argument("--card", help="deployment card (cards/<variant>.json): its guardrails, its variant, and its "
                                  "reference profile's temperature, top_p and max tokens as the defaults of "
                                  "requests that leave them out")
    p.add_argument("--guardrails", help="guardrails file (.toml, .yaml, .json); overrides the card's")
    p.add_argument("--api-keys-file", help="file with one API key per line (also read: $LIGERO_API_KEYS); "
                                           "no keys = no auth")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=_positive_int, default=16,
                   help="requests decoded together: the continuous batch's rows (default 16, the most the decode "
                        "kernels take in one step)")
    p.add_argument("--max-waiting", type=_count, default=64,
                   help="requests that may wait for a free row; more are answered 429 (default 64)")
    p.add_argument("--prefill-chunk", type=_positive_int, default=128,
                   help="prompt tokens fed between two decode steps while other requests decode (default 128)")
    p.add_argument("--stream-interval", type=float, default=None, metavar="MS",
                   help="hand a stream's tokens to its client at most every MS milliseconds while up to 4 rows "
                        "decode, in proportion longer beyond (default 16, one frame at 60 Hz; 16 rows: 64; the first "
                        "token and the end go at once; 0: every token)")
    p.add_argument("--kv-cache", choices=("auto", "f16", "f32"), default="auto",
                   help="how continuous batching stores keys and values (packed KV caches keep their format). "
                        "auto (default): f16 on CPU with the native kernels, as llama.cpp (half the memory and half "
                        "what attention reads per step), else the model's dtype")
    p.add_argument("--keep-text", action="store_true", help="store output texts too (default: statistics only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without an API key even when keys are on (default: it needs one)")
    p.add_argument("--watermark", metavar="KEYFILE", help="mark every response with this watermark key (the key "
                                                          "stays secret: responses and records carry its id)")
    p.add_argument("--vision", nargs="?", const="shipped", metavar="ADAPTER",
                   help="serve the vision-language model (chat messages may carry images as base64 data URLs): the "
                        "adapter Ligero ships, or a folder `ligero lab vision` wrote; --variant schemes quantize its "
                        "language model")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a client must send its request body within this time, else 408 (default 30)")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ligero", description="Run, quantize and audit small language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate text (streams tokens)")
    _add_model_args(p)
    p.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    _add_scheme_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="ask about this image (repeatable): the prompt is the question, answered by the vision model")
    p.add_argument("--adapter", metavar="DIR", help="with --image: a vision adapter `ligero lab vision` wrote "
                   "(default: the one shipped with Ligero)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--watermark", metavar="KEYFILE", help="mark the output with this watermark key "
                                                          "(`ligero watermark keygen`)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens only (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: likeliest tokens up to this probability mass")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print token count and finish reason to stderr")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="quantize a model and save it (packed) to a folder")
    _add_model_args(p)
    _add_scheme_args(p, required=True, help="saved packed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a model (or a quantized variant of it) as a GGUF file for llama.cpp")
    _add_model_args(p)
    _add_scheme_args(p, required=False, help="exported (q8_0, int4, int4-sym, fp32); without it, the model as "
                     "loaded: a GGUF's Q8_0 / Q4_0 / Q4_1 tensors byte for byte")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format")
    p.add_argument("--out", required=True, help="output file (.gguf)")
    p.add_argument("--float16", action="store_true", help="write full-precision matrices as F16 (default F32)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_export)

    _add_finetune_command(sub)

    p = sub.add_parser("eval", help="evaluate perplexity, speed, or quantization quality")
    p.add_argument("what", choices=["ppl", "speed", "quality"], help="perplexity, tok/s, or quantized vs base")
    _add_model_args(p)
    _add_scheme_args(p, help="quantize on the fly first (quality: compared with --model)")
    p.add_argument("--text", help="UTF-8 text file (default: the Wikipedia evaluation split)")
    p.add_argument("--ctx", type=_positive_int, default=512, help="window / prefill length in tokens")
    p.add_argument("--max-tokens", type=_positive_int, default=4096, help="tokens of text to score (ppl)")
    p.add_argument("--decode-tokens", type=_positive_int, default=128, help="tokens per speed run (default 128)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="speed runs; the median is reported (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="the audit of the default model and variants: report, cards, recommendation")
    _add_audit_args(p)
    p.set_defaults(func=cmd_run)

    _add_audit_command(sub)

    _add_serve_command(sub)

    p = sub.add_parser("monitor", help="production traffic against a deployment card: drift and A/B analysis",
                       description="Production traffic in the store against a deployment card: drift and A/B "
                                   "analysis. Exit codes (for cron): 0 OK (or too little traffic to judge yet), "
                                   "1 WARN, 2 ALERT (also a usage error: one `ligero: error:` line), 3 nothing to "
                                   "judge (no traffic from the card's variant in the window: a wrong store, card or "
                                   "--since, or a variant that serves nothing).")
    p.add_argument("--store", default="sqlite:///ligero-serve.db", help="the serving store URL (SQLite or PostgreSQL)")
    p.add_argument("--card", required=True, help="the deployed variant's cards/<variant>.json")
    p.add_argument("--since", help="only traffic after this: a duration (30m, 24h, 7d) or an ISO time")
    p.add_argument("--out", default="ligero-out/monitor", help="folder for monitor.json and monitor.html")
    p.add_argument("--variants", help="with --split: the planned A/B split, e.g. --variants fp32,int4 --split 50,50")
    p.add_argument("--split", help="planned shares for the sample-ratio-mismatch check")
    p.set_defaults(func=cmd_monitor)

    _add_card_commands(sub)
    _add_watermark_commands(sub)
    _add_lab_commands(sub)
    return parser


def _add_watermark_commands(sub) -> None:
    """`ligero watermark keygen | detect`."""
    wm = sub.add_parser("watermark", help="watermark keys and detection of marked text").add_subparsers(
        dest="watermark_command", required=True)
    p = wm.add_parser("keygen", help="create a secret watermark key for a model's tokenizer",
                      description="Create a watermark key: a random secret, the scheme's settings and the tokenizer "
                                  "they apply to. Mark text with `ligero generate --watermark KEY` or `ligero serve "
                                  "--watermark KEY`; detect it with `ligero watermark detect --key KEY`.")
    p.add_argument("--out", required=True, help="the key file to write (created readable by you only)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model whose tokenizer the key is for "
                                                          f"(default {DEFAULT_MODEL})")
    p.add_argument("--preset", default="lefthash", help="lefthash (Kirchenbauer et al.'s default), selfhash (more "
                                                        "robust to edits) or unigram (one fixed green list)")
    p.add_argument("--gamma", type=float, default=0.25, help="share of the vocabulary that is green (default 0.25)")
    p.add_argument("--delta", type=float, default=2.0, help="bias added to green logits (default 2)")
    p.add_argument("--context-width", type=int, help="kgw: tokens of context that seed the green list")
    p.add_argument("--seeding", help="kgw: how the context seeds it: additive, min or skip")
    p.add_argument("--self-hash", action="store_true", help="kgw: the candidate token joins the seed (SelfHash)")
    p.set_defaults(func=cmd_watermark_keygen)
    p = wm.add_parser("detect", help="test a text for the watermark of a key (exit 0: marked, 1: not marked)",
                      description="Count the green tokens of a text under a key and test them against chance: "
                                  "prints z, the one-sided p-value and a verdict. Exit code 0 when the text is "
                                  "watermarked, 1 when it is not, 2 on an error.")
    p.add_argument("file", nargs="?", default="-", help="UTF-8 text file, or - for standard input (default)")
    p.add_argument("--key", required=True, help="the watermark key file")
    p.add_argument("--model", help="the model whose tokenizer reads the text (default: the key's model)")
    p.add_argument("--json", action="store_true", help="print the detection as JSON")
    p.add_argument("--z-threshold", type=float, default=4.0, help="z at or above which the text counts as "
                                                                  "watermarked (default 4)")
    p.add_argument("--min-tokens", type=_positive_int, default=16,
                   help="fewest scored tokens for a verdict (default 16)")
    p.set_defaults(func=cmd_watermark_detect)


def cmd_lab_train(args) -> int:
    from ligero.lab.runs import RunSpec, train_run
    from ligero.lab.trainer import TrainConfig

    spec = RunSpec(args.size, ternary=args.ternary, weight_scale=args.weight_scale, width_factor=args.width_factor,
                   vocab_size=args.vocab)
    tc = TrainConfig(steps=args.steps, batch_rows=args.batch_rows, seq_len=args.seq_len, accum=args.accum, lr=args.lr,
                     warmup_steps=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
                     eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                     checkpoint_every=args.checkpoint_every, seed=args.seed)
    summary = train_run(spec, tc, args.out, processes=args.processes)
    print(f"{summary['label']}: eval loss {summary['final_eval_loss']:.4f} after {summary['tokens']:,} tokens; "
          f"model saved to {Path(args.out) / 'model'}")
    return 0


def cmd_lab_bitnet(args) -> int:
    from ligero.lab.bitnet import lab_bitnet

    result = lab_bitnet(args.quick, args.out, None if args.no_docs else args.docs)
    for r in result["rows"]:
        print(f"{r['size']}: fp {r['fp_loss']:.4f}, b158 {r['b158_loss']:.4f} ({r['gap_loss_pct']:+.1f} %)")
    if not args.no_docs:
        print(f"wrote {Path(args.docs) / 'lab-bitnet.md'}")
    return 0


def cmd_lab_moe(args) -> int:
    from ligero.lab.moe import lab_moe

    result = lab_moe(args.quick, args.out, None if args.no_docs else args.docs)
    for r in result["rows"]:
        print(f"{r['arm']}: eval loss {r['eval_loss']:.4f} ({r['gap_vs_dense_pct']:+.1f} % vs dense), "
              f"{r['time_vs_dense']:.2f}x dense's time per token")
    if not args.no_docs:
        print(f"wrote {Path(args.docs) / 'lab-moe.md'}")
    return 0


def cmd_lab_collapse(args) -> int:
    from ligero.lab.collapse import lab_collapse

    result = lab_collapse(args.quick, args.out, None if args.no_docs else args.docs)
    for line in result["findings"]:
        print(line)
    if not args.no_docs:
        print(f"wrote {Path(args.docs) / 'lab-collapse.md'}")
    return 0


def cmd_lab_vision(args) -> int:
    from ligero.lab.vision import lab_vision

    result = lab_vision(args.quick, args.out, None if args.no_docs else args.docs, ship=args.ship)
    if not args.no_docs:
        print(f"wrote {Path(args.docs) / 'lab-vision.md'}")
    if args.ship:
        print(f"wrote the adapter to {args.ship}")
    return 0 if result else 1


def _add_lab_commands(sub) -> None:
    """`ligero lab train`: one training run of the labs' tiny models (resumes when its folder has a checkpoint)."""
    lab_sub = sub.add_parser("lab", help="training labs on CPU").add_subparsers(dest="lab_command", required=True)
    p = lab_sub.add_parser("train", help="train a tiny model from scratch (full precision or BitNet b1.58)",
                           description="Train a tiny Llama-style model on the training split. Rerun the same "
                                       "command to resume after an interruption.")
    p.add_argument("--size", default="s", help="model size: test, xs, s, m or l (see ligero.lab.models.SIZES)")
    p.add_argument("--ternary", action="store_true", help="BitNet b1.58: ternary weights, int8 activations")
    p.add_argument("--weight-scale", default="absmean", help="ternary scale: absmean (paper) or absmedian (Reloaded)")
    p.add_argument("--width-factor", type=_positive_int, default=1, help="multiply hidden and FFN widths")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the training split")
    p.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps")
    p.add_argument("--batch-rows", type=_positive_int, default=32, help="sequences per optimizer step, in all")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per training sequence (the context)")
    p.add_argument("--accum", type=_positive_int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--schedule", default="cosine", help="cosine, or two_stage (BitNet b1.58's)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--eval-every", type=_positive_int, default=50, help="steps between evaluation losses")
    p.add_argument("--eval-tokens", type=_positive_int, default=16384, help="evaluation-split tokens scored")
    p.add_argument("--checkpoint-every", type=_positive_int, default=50, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument("--processes", type=_positive_int, default=1, help="data-parallel processes (gloo, loopback)")
    p.add_argument("--out", required=True, help="run folder: log, checkpoint, run.json and the trained model")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_lab_train)
    experiments = {
        "bitnet": (cmd_lab_bitnet, "BitNet b1.58 from scratch vs full precision at several sizes",
                   "Full precision against BitNet b1.58 at several sizes on the same tokens, learning rates swept per "
                   "arm, seeds at the smallest size, a doubled-width ternary model", "(the tests' run, ~2 minutes)"),
        "moe": (cmd_lab_moe, "mixture of experts vs dense models from scratch (routing ablations)",
                "Dense against MoE (top-2 and top-1, with and without the balancing loss, the router z-loss and a "
                "capacity factor) and a dense model with the MoE's total parameters, on the same tokens, learning "
                "rates swept per arm", "(the tests' run)"),
        "collapse": (cmd_lab_collapse, "model collapse: generations trained on their predecessors' samples",
                     "Generation 0 learns human text; each next generation a fresh model trained on the previous "
                     "one's samples: replacing the data, keeping 10 % human data, accumulating all data, dropping "
                     "watermarked or unlikely texts; plus the Gaussian fit-sample-refit model",
                     "(two generations: the tests' run)"),
        "vision": (cmd_lab_vision, "a LLaVA-style image + text model: projector and LoRA on SmolLM2",
                   "EfficientNet-Lite0 features projected into SmolLM2-135M-Instruct, trained in two stages (captions, "
                   "then questions) on rendered charts, forms, shape scenes and emoji; held-out accuracy against the "
                   "text-only model and chance", "(a few images and steps: the tests' run)"),
    }
    for name, (func, summary, description, quick) in experiments.items():
        p = lab_sub.add_parser(name, help=summary,
                               description=f"{description}; writes docs/lab-{name}.md. Rerun to resume.")
        p.add_argument("--quick", action="store_true", help=f"tiny models and few steps {quick}")
        p.add_argument("--out", default=f"ligero-out/lab-{name}", help="folder of the runs (reused when rerun)")
        p.add_argument("--docs", default="docs", help=f"where lab-{name}.md, .json and the figures go")
        p.add_argument("--no-docs", action="store_true", help="write no document (results stay in --out)")
        _add_threads_arg(p)
        p.set_defaults(func=func)
    lab_sub.choices["vision"].add_argument(
        "--ship", metavar="DIR", help="also write the trained adapter here (src/ligero/vision/weights/"
                                      "smollm2-135m-vision is the one the package ships)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)  # the kernels split their work with torch's thread pool too
    try:
        return args.func(args)
    except LigeroError as exc:
        print(f"ligero: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ligero: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
