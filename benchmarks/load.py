"""Load test of `ligero serve` on loopback: N concurrent clients for a bounded time against one variant.

    python benchmarks/load.py [--variant int4] [--concurrency 1,4,8,16] [--seconds 25] [--max-tokens 32]

Starts `ligero serve --variant V` with a fresh SQLite store, then for each concurrency level runs that many
client threads, each sending completion requests back to back (ordinary prompts, sampled at temperature 0.7, 32 new
tokens) until the time is up. Reports throughput (requests/s and generated tokens/s), p50 / p95 latency, the mean
batch size the server decoded, and checks that every acknowledged request (HTTP 200 with a response id) is in the
store with its request row: "lost" must be 0. Writes docs/serving.json and docs/serving.md, with paths relative to
the repository (`--rewrite-docs` rewrites both from docs/serving.json, e.g. after a change to the Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from common import cpu_jiffies, machine, own_cpu_jiffies  # noqa: E402
from ligero.eval.profile import profile_prompts  # noqa: E402
from ligero.io.checkpoint import load_model  # noqa: E402
from ligero.serve.monitor import monitor  # noqa: E402
from ligero.serve.store import Store  # noqa: E402

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_jiffies(pid: int) -> int:
    """CPU time (user + system, all threads) of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def start_server(variant: str, store_url: str, port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ligero.cli", "serve", "--model", MODEL, "--variant", variant, "--store", store_url,
           "--port", str(port), "--max-batch", str(max_batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy within 300 s")


def batches_done(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r"^ligero_batches_total\{[^}]*\} (\S+)$", text, re.M))


def run_level(base: str, clients: int, seconds: float, prompts: list[str], max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as http:
            i = 0
            while time.monotonic() < deadline:
                body = {"model": MODEL, "prompt": prompts[(k * 997 + i) % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0.7, "top_p": 0.9, "seed": k * 100_000 + i, "user": f"load-{k}"}
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/completions", json=body)
                    row = {"status": r.status_code, "seconds": time.perf_counter() - t0}
                    if r.status_code == 200:
                        data = r.json()
                        row.update(id=data["id"], tokens=data["usage"]["completion_tokens"])
                except httpx.HTTPError as exc:
                    row = {"status": 0, "seconds": time.perf_counter() - t0, "error": type(exc).__name__}
                with lock:
                    results.append(row)
                i += 1

    b0 = batches_done(base)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # includes the requests still running at the deadline
    batches = batches_done(base) - b0
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([1000 * r["seconds"] for r in ok]) if ok else np.array([np.nan])
    return {
        "clients": clients, "seconds": wall, "requests": len(results), "ok": len(ok),
        "errors": len(results) - len(ok), "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p95": float(np.percentile(lat, 95)), "mean_batch_rows": len(ok) / batches if batches else None,
        "ids": [r["id"] for r in ok],
    }


def check_store(store_url: str, ids: list[str]) -> dict:
    """Every acknowledged response must be in the store, with its request recorded as served."""
    store = Store(store_url)
    lost = []
    for rid in ids:
        resp = store.get_response(rid)
        req = store.get_request(resp.request_id) if resp else None
        if resp is None or req is None or req.status not in ("ok", "blocked"):
            lost.append(rid)
    counts = {t: store.count(t) for t in ("requests", "responses")}
    store.close()
    return {"acknowledged": len(ids), "found": len(ids) - len(lost), "lost": len(lost), "lost_ids": lost[:10],
            **{f"store_{k}": v for k, v in counts.items()}}


def repo_path(path: str) -> str:
    """`path` relative to the repository (a card under ligero-out/), so the docs hold no machine's absolute paths;
    a path from another checkout keeps its part from ligero-out/ on."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    if p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    parts = p.parts
    return str(Path(*parts[parts.index("ligero-out"):])) if "ligero-out" in parts else p.name


def write_docs(result: dict, docs: Path) -> None:
    if result.get("monitor"):
        result["monitor"]["card"] = repo_path(result["monitor"]["card"])
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "serving.json").write_text(json.dumps(result, indent=1))
    m, s = result["machine"], result["settings"]
    lines = [
        "# Serving under load", "",
        f"`python benchmarks/load.py`: `ligero serve --variant {s['variant']}` ({MODEL}) on loopback, N client threads "
        f"sending completion requests back to back for {s['seconds']:g} s per level ({s['max_tokens']} new tokens, "
        f"temperature 0.7, ordinary prompts of {s['prompt_tokens_mean']:.0f} tokens on average), dynamic batching "
        f"of up to {s['max_batch']} requests, SQLite store (every record committed before the answer is sent).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['commit']}; other processes used "
        f"{100 * result['foreign_cpu_share']:.1f} % of the CPU during the run.", "",
        "| clients | requests | req/s | generated tok/s | p50 latency (ms) | p95 latency (ms) | mean batch rows "
        "| errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["levels"]:
        lines.append(f"| {r['clients']} | {r['ok']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['latency_ms_p50']:.0f} | {r['latency_ms_p95']:.0f} | "
                     f"{r['mean_batch_rows'] or 0:.2f} | {r['errors']} |")
    st = result["store_check"]
    one, top = result["levels"][0], max(result["levels"], key=lambda r: r["tokens_per_s"])
    lines += [
        "", f"**Store check:** {st['acknowledged']} acknowledged responses, {st['found']} found in the store with "
        f"their requests, **{st['lost']} lost** (store rows: {st['store_requests']} requests, "
        f"{st['store_responses']} responses, including the warm-up).", "",
        f"Throughput grows with concurrency through batching: {top['tokens_per_s']:.0f} generated tok/s with "
        f"{top['clients']} clients vs {one['tokens_per_s']:.0f} with one client "
        f"({top['tokens_per_s'] / one['tokens_per_s']:.2f}x), at the cost of latency (p50 "
        f"{one['latency_ms_p50']:.0f} -> {top['latency_ms_p50']:.0f} ms). The batcher is dynamic, not continuous: "
        "requests that arrive while a batch decodes wait for the next one, so p95 latency includes up to one "
        "batch's decode time of queueing.", "",
    ]
    if result.get("monitor"):
        mon = result["monitor"]
        lines += [f"**`ligero monitor` on this traffic** against the card `{mon['card']}` (its reference profile: "
                  f"{mon['n_reference']} requests answered in batches of {mon['reference_batch']}): overall "
                  f"**{mon['status']}** over {mon['n_responses']} responses.", "",
                  "| signal | status | reference mean | production mean | bins | PSI | JS | KS p |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        fmt = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731
        for name, sig in mon["signals"].items():
            lines.append(f"| {name} | {sig['status']} | " + " | ".join(fmt(sig[k]) for k in (
                "mean_reference", "mean_production", "bins", "psi", "jensen_shannon", "ks_p_value")) + " |")
        lines += ["", "Under sustained load from up to 16 clients, latency is expected to drift from the card's "
                  "profile; what the model says (length, log-prob, toxicity) should not."]
        if any(sig["bins"] is None for sig in mon["signals"].values()):
            lines += ["", "PSI and Jensen-Shannon need at least 20 values per bin in the effective sample size "
                      "nm/(n+m) for two bins (so the no-drift PSI stays under 0.05); a reference profile of "
                      f"{mon['n_reference']} responses cannot reach that, so KS decides (`ligero.serve.drift`)."]
        lines.append("")
    (docs / "serving.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rewrite-docs", action="store_true", help="rewrite docs/serving.md from docs/serving.json")
    ap.add_argument("--variant", default="int4")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--card", default="auto", help="the variant's deployment card for `ligero monitor` on the load's "
                    "traffic (default: the newest ligero-out/*/cards/<variant>.json of a full run; 'none' to skip)")
    args = ap.parse_args()
    if args.rewrite_docs:
        write_docs(json.loads((Path(args.docs) / "serving.json").read_text()), Path(args.docs))
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.card == "auto":
        cards = sorted(ROOT.glob(f"ligero-out/*-standard-*/cards/{args.variant.replace('+', '_')}.json"),
                       key=lambda f: f.stat().st_mtime)
        args.card = str(cards[-1]) if cards else None
    elif args.card == "none":
        args.card = None
    prompts, info = profile_prompts(200, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"sqlite:///{tmp}/load.db"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(args.variant, store_url, port, args.max_batch)
        try:
            tok = load_model(MODEL, device="cpu").tokenizer
            prompt_tokens = float(np.mean([len(tok.encode(p)) for p in prompts]))
            httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": prompts[0], "max_tokens": 4},
                       timeout=120).raise_for_status()  # warm-up
            busy0, total0 = cpu_jiffies()
            own0, server0 = own_cpu_jiffies(), process_jiffies(server.pid)
            rows = []
            for n in levels:
                row = run_level(base, n, args.seconds, prompts, args.max_tokens)
                print(f"{n:>3} clients: {row['ok']} ok, {row['errors']} errors, {row['requests_per_s']:.2f} req/s, "
                      f"{row['tokens_per_s']:.1f} tok/s, p50 {row['latency_ms_p50']:.0f} ms, "
                      f"p95 {row['latency_ms_p95']:.0f} ms, batch rows {row['mean_batch_rows'] or 0:.2f}", flush=True)
                rows.append(row)
            busy, total = cpu_jiffies()
            ours = (own_cpu_jiffies() - own0) + (process_jiffies(server.pid) - server0)
            foreign = max(0, (busy - busy0) - ours) / max(1, total - total0)
        finally:
            server.terminate()
            server.wait(timeout=60)
        ids = [i for r in rows for i in r.pop("ids")]
        check = check_store(store_url, ids)
        drift = None
        if args.card:
            res = monitor(store_url, args.card, out_dir=Path(tmp) / "monitor")
            profile = json.loads(Path(args.card).read_text())["monitoring"]["reference_profile"]
            drift = {"card": args.card, "status": res["status"], "n_responses": res["n_responses"],
                     "n_reference": profile["n"], "reference_batch": profile["sampling"].get("batch_size", 1),
                     "signals": {k: {key: v[key] for key in ("status", "mean_reference", "mean_production", "bins",
                                                              "psi", "jensen_shannon", "ks_p_value")}
                                 for k, v in res["drift"]["signals"].items()}}
    print(f"store check: {check['acknowledged']} acknowledged, {check['lost']} lost")
    result = {"machine": machine(), "foreign_cpu_share": foreign, "prompts": info,
              "settings": {"variant": args.variant, "seconds": args.seconds, "max_tokens": args.max_tokens,
                           "max_batch": args.max_batch, "prompt_tokens_mean": prompt_tokens},
              "levels": rows, "store_check": check, "monitor": drift}
    write_docs(result, Path(args.docs))
    if check["lost"]:
        raise SystemExit(f"{check['lost']} acknowledged responses are missing from the store")


if __name__ == "__main__":
    main()
