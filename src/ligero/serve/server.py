"""Build and run `ligero serve`: load each variant, start its batching engine, apply the guardrails and the A/B
experiment, and hand the app to uvicorn."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ligero.card import read_card
from ligero.errors import LigeroError
from ligero.eval.variants import BASELINE, build_variant, scheme_recipe
from ligero.kernels import warm as warm_kernels
from ligero.models.registry import REGISTRY
from ligero.serve.abtest import SegmentRule
from ligero.serve.access import ApiKeys
from ligero.serve.app import create_app
from ligero.serve.config import BODY_TIMEOUT_S, RequestDefaults, ServerConfig, Variant
from ligero.serve.engine import STREAM_INTERVAL_S, Engine, check_kv_cache, claim, run_engines
from ligero.serve.guardrails import Guardrails, guardrails_from_card, load_guardrails
from ligero.serve.store import DEFAULT_URL, Store, default_server_id
from ligero.watermark import Watermarker, load_key

log = logging.getLogger("ligero.serve")


def parse_variant(text: str) -> tuple[str, str]:
    """"NAME=SCHEME" or "NAME=PATH" (a model saved by `ligero quantize`), or just "SCHEME" (named after it)."""
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep:
        name, spec = text.strip(), text.strip()
    if not name or not spec or ":" in name:
        raise LigeroError(f"--variant {text!r} is malformed; write NAME=SCHEME (e.g. int4=int4), NAME=FOLDER of a "
                          f"model saved by `ligero quantize`, or just SCHEME")
    return name, spec


def load_variant(model_id: str, spec: str, device: str = "cpu"):
    """A served model: the base model quantized on the fly with scheme `spec`, or a saved model folder."""
    if Path(spec).expanduser().is_dir():
        return build_variant(spec, device=device)
    return build_variant(model_id, spec, device=device)


def build_config(model_id: str, variants: list[str], split: list[float] | None = None, store_url: str | None = None,
                 card: str | None = None, guardrails_file: str | None = None, api_keys_file: str | None = None,
                 segment_rules: list[SegmentRule] | None = None, experiment: str | None = None, max_batch: int = 16,
                 keep_text: bool = False, device: str = "cpu", public_metrics: bool = False,
                 body_timeout_s: float = BODY_TIMEOUT_S, watermark_file: str | None = None,
                 vision: bool = False, vision_adapter: str | None = None, max_waiting: int = 64,
                 prefill_chunk: int = 128, kv_cache: str = "auto",
                 stream_interval_ms: float | None = None) -> ServerConfig:
    """Everything `ligero serve` needs; every input is checked before any model is loaded. With a card, requests
    that leave out temperature, top_p or max_tokens get the card's reference-profile settings. With a watermark
    key file, every response is marked with that key (the secret stays in this process; records name the key id).
    With `vision`, every variant is the vision-language model (`vision_adapter`, None: the one Ligero ships) with its
    language model quantized by the variant's scheme; chat requests may then carry images."""
    card_data = read_card(card) if card else None
    key = load_key(watermark_file) if watermark_file else None
    if guardrails_file:
        guardrails = load_guardrails(guardrails_file)
    elif card_data is not None:
        guardrails = guardrails_from_card(card_data, str(card))
    else:
        guardrails = Guardrails()
    defaults = RequestDefaults.from_card(card_data, str(card)) if card_data is not None else RequestDefaults()
    if not body_timeout_s > 0:
        raise LigeroError(f"--body-timeout must be a number of seconds > 0, got {body_timeout_s}")
    if stream_interval_ms is None:
        stream_interval_ms = STREAM_INTERVAL_S * 1000
    if not 0 <= stream_interval_ms <= 1000:
        raise LigeroError(f"--stream-interval must be between 0 and 1000 ms, got {stream_interval_ms:g}")
    engine_options = dict(max_batch=max_batch, max_waiting=max_waiting, prefill_chunk=prefill_chunk, kv_cache=kv_cache,
                          stream_interval_s=stream_interval_ms / 1000)
    check_kv_cache(kv_cache)
    for option, value, least in (("--max-batch", max_batch, 1), ("--max-waiting", max_waiting, 0),
                                 ("--prefill-chunk", prefill_chunk, 1)):
        if value < least:
            raise LigeroError(f"{option} must be at least {least}, got {value}")
    if not variants:
        variants = [card_data["identity"]["variant"]] if card_data else [BASELINE]
        finetune = (card_data or {}).get("format", {}).get("finetune")
        if finetune:  # a fine-tuned variant (ft, ft+<scheme>): the adapter folder is the model, the scheme its variant
            from ligero.io.adapter import adapter_digest, is_adapter_folder

            folder = Path(model_id).expanduser()
            if not is_adapter_folder(folder) or adapter_digest(folder) != finetune["adapter_sha256"]:
                raise LigeroError(f"{card} describes a model fine-tuned with adapter {finetune['adapter']} (sha256 "
                                  f"{finetune['adapter_sha256'][:12]}…): pass that `ligero finetune` run folder with "
                                  "--model")
            variants = [f"{variants[0]}={variants[0].partition('+')[2] or BASELINE}"]
    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise LigeroError(f"variant names must be unique, got {names}")
    for _, spec in parsed:
        if not Path(spec).expanduser().is_dir():
            scheme_recipe(spec)  # an unknown scheme fails here, with the valid ones, before any model loads
    if split is not None and len(split) != len(parsed):
        raise LigeroError(f"--split has {len(split)} shares for {len(parsed)} variants; give one per --variant")
    if vision:
        return _vision_config(parsed, vision_adapter, key, watermark_file, guardrails, split, experiment,
                              segment_rules, store_url, keep_text, engine_options, device, defaults, api_keys_file,
                              public_metrics, body_timeout_s)
    if model_id not in REGISTRY and not Path(model_id).expanduser().exists():
        raise LigeroError(f"model {model_id!r} not found; use a registry id ({', '.join(REGISTRY)}) or a path")
    api_keys = ApiKeys.load(file=api_keys_file)
    store = Store(store_url or DEFAULT_URL, keep_output_text=keep_text)
    lock = threading.Lock()
    served, tokenizer, context = {}, None, 8192
    for name, spec in parsed:
        log.warning("loading variant %s (%s)", name, spec)
        loaded = load_variant(model_id, spec, device)
        if loaded.tokenizer is None:
            raise LigeroError(f"{spec} has no tokenizer; serve a model with tokenizer.json or a GGUF file")
        tokenizer, context = loaded.tokenizer, loaded.model.cfg.max_seq_len
        served[name] = Variant(name, spec, Engine(name, loaded.model, loaded.tokenizer, compute_lock=lock,
                                                          **engine_options))
    watermark = None
    if key is not None:
        key.check_tokenizer(tokenizer, model_id, f"the watermark key {watermark_file}")
        watermark = Watermarker(key, max(v.engine.model.cfg.vocab_size for v in served.values()))
        log.warning("marking every response with watermark key %s (%s)", key.key_id, key.settings.describe())
    cfg = ServerConfig(model_id=Path(model_id).name if model_id not in REGISTRY else model_id, variants=served,
                       tokenizer=tokenizer, store=store, guardrails=guardrails, split=split,
                       experiment_name=experiment, segment_rules=segment_rules or [], api_keys=api_keys,
                       server_id=default_server_id(), context=context, defaults=defaults,
                       public_metrics=public_metrics, body_timeout_s=body_timeout_s, watermark=watermark)
    cfg.experiment()  # validates the split against the variants now, not on the first request
    return cfg


def _vision_config(parsed, adapter, key, watermark_file, guardrails, split, experiment, segment_rules, store_url,
                   keep_text, engine_options, device, defaults, api_keys_file, public_metrics, body_timeout_s):
    from ligero.eval.variants import build_vision_variant
    from ligero.vision.images import DEFAULT_LIMITS
    from ligero.vision.pretrained import DEFAULT_ADAPTER, read_adapter

    for _, spec in parsed:
        if Path(spec).expanduser().is_dir():
            raise LigeroError(f"--vision serves the vision model quantized on the fly; {spec} is a saved folder: "
                              "give a scheme (int8, int4, ...) instead")
    _, meta = read_adapter(adapter or DEFAULT_ADAPTER)  # a bad adapter fails before any model loads
    model_id = f"{meta['base_model']['id']}-vision"
    api_keys = ApiKeys.load(file=api_keys_file)
    store = Store(store_url or DEFAULT_URL, keep_output_text=keep_text)
    lock = threading.Lock()
    served = {}
    for name, spec in parsed:
        log.warning("loading vision variant %s (%s)", name, spec)
        vlm = build_vision_variant(adapter, spec, device=device)
        served[name] = Variant(name, spec, Engine(name, vlm.lm, vlm.tokenizer, compute_lock=lock, **engine_options),
                               vision=vlm)
    tokenizer = next(iter(served.values())).vision.tokenizer
    watermark = None
    if key is not None:
        key.check_tokenizer(tokenizer, meta["base_model"]["id"], f"the watermark key {watermark_file}")
        watermark = Watermarker(key, max(v.engine.model.cfg.vocab_size for v in served.values()))
    cfg = ServerConfig(model_id=model_id, variants=served, tokenizer=tokenizer, store=store, guardrails=guardrails,
                       split=split, experiment_name=experiment, segment_rules=segment_rules or [], api_keys=api_keys,
                       server_id=default_server_id(), context=next(iter(served.values())).engine.model.cfg.max_seq_len,
                       defaults=defaults, public_metrics=public_metrics, body_timeout_s=body_timeout_s,
                       watermark=watermark, image_limits=DEFAULT_LIMITS)
    cfg.experiment()
    return cfg


def serve(cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the HTTP server in a thread and the engines' decoding in this (the main) thread, where the models were
    loaded: see engine.run_engines for why decoding belongs to the process's first thread. SIGTERM / SIGINT stop
    both; a server that cannot start (its port taken) ends the process with code 1."""
    import gc
    import signal

    import uvicorn

    kernel_path = warm_kernels()  # build / load the CPU kernels now: the first request must not pay for it
    app = create_app(cfg)
    variants = ", ".join(f"{n} ({v.scheme})" for n, v in cfg.variants.items())
    exp = cfg.experiment()
    print(f"ligero serve: http://{host}:{port}  model {cfg.model_id}  variants {variants}"
          + (f"  experiment {exp.name} split {[round(100 * s) for s in exp.split]}" if exp else "")
          + f"  store {cfg.store.url}  decode on {kernel_path}", flush=True)
    print(f"ligero serve: requests that leave them out get {cfg.defaults.describe()}", flush=True)
    if cfg.watermark is not None:
        print(f"ligero serve: every response is watermarked with key {cfg.watermark.key_id}", flush=True)
    web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    http_thread = threading.Thread(target=web.run, name="ligero-http", daemon=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    engines = [v.engine for v in cfg.variants.values()]
    claim(engines)  # before the first request could give an engine a thread of its own
    # What is loaded now (models, tokenizers, the app) lives as long as the server: frozen out of the collector's
    # generations, the collections that each step's garbage sets off no longer walk it
    gc.collect()
    gc.freeze()
    http_thread.start()
    watcher = threading.Thread(target=lambda: (http_thread.join(), stop.set()), daemon=True)
    watcher.start()  # the HTTP server ended (it could not bind its port, say): stop decoding too
    try:
        run_engines(engines, stop)
        stop.wait()
    finally:
        web.should_exit = True  # the HTTP server drains its requests; keep decoding for them meanwhile
        drained = threading.Event()
        threading.Thread(target=lambda: (http_thread.join(timeout=30), drained.set()), daemon=True).start()
        run_engines(engines, drained)
        drained.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for engine in engines:
            engine.close()
        cfg.store.close()
    return 0 if web.started else 1
