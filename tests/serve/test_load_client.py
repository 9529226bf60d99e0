"""benchmarks/load.py's own HTTP client (one asyncio event loop, keep-alive HTTP/1.1) against a small scripted server:
streamed completions are read to their end and counted, connections are reused, a server that closes after each
stream (as llama-server does) costs no request, and refusals are errors with their status."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


class ScriptedServer:
    """HTTP/1.1 on loopback in its own thread: each POST gets `status`; a 200 streams `tokens` SSE text events in
    chunked encoding, then usage and [DONE]; `close_after` closes the connection after each response."""

    def __init__(self, status: int = 200, tokens: int = 3, close_after: bool = False):
        self.status, self.tokens, self.close_after = status, tokens, close_after
        self.connections = self.requests = 0
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                self.bodies.append(json.loads(await reader.readexactly(length)))
                self.requests += 1
                if self.status != 200:
                    body = json.dumps({"error": {"message": "busy", "code": "queue_full"}}).encode()
                    writer.write(f"HTTP/1.1 {self.status} Too Many Requests\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    events = [{"id": "cmpl-1", "choices": [{"text": f" w{i}", "finish_reason": None}]}
                              for i in range(self.tokens)]
                    events.append({"id": "cmpl-1", "choices": [{"text": "", "finish_reason": "length"}],
                                   "usage": {"completion_tokens": self.tokens}})
                    for event in events:
                        data = f"data: {json.dumps(event)}\n\n".encode()
                        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        await writer.drain()
                    writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def shutdown() -> None:  # end the open connections' handlers while the loop still runs
            self.server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def load():
    spec = importlib.util.spec_from_file_location("load_client_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("close_after", [False, True], ids=["keep-alive", "closes-after-each-stream"])
def test_closed_loop_clients_read_every_stream_to_its_end(load, close_after):
    server = ScriptedServer(tokens=5, close_after=close_after)
    try:
        level = load.run_level(server.base, 3, 0.3, ["a", "b", "c", "d"], 5, [2])
    finally:
        server.stop()
    assert level["errors"] == 0 and level["ok"] == level["requests"] == server.requests > 3
    assert level["tokens_per_request"] == 5 and level["ids"] == ["cmpl-1"] * level["ok"]
    assert level["ttft_ms_p50"] is not None and level["event_gap_ms_p50"] is not None
    # keep-alive: one connection per client; a server that closes after each stream: one per request, none lost
    assert server.connections == (server.requests if close_after else 3)
    body = server.bodies[0]
    assert body["stream"] and body["max_tokens"] == 5 and body["logit_bias"] == {"2": -100}


def test_a_refusal_is_an_error_with_its_status(load):
    server = ScriptedServer(status=429)
    try:
        level = load.run_level(server.base, 2, 0.2, ["a"], 5, [])
    finally:
        server.stop()
    assert level["ok"] == 0 and level["errors"] == level["requests"] > 0
    assert level["error_examples"][0] == "HTTP 429" and level["tokens_per_s"] == 0


def test_a_server_that_is_gone_is_an_error_not_a_hang(load):
    server = ScriptedServer()
    base = server.base
    server.stop()
    row = load.one_request(base, {"prompt": "a", "max_tokens": 2, "stream": True})
    assert not row["done"] and row["error"] in {"ConnectionRefusedError", "OSError"}
