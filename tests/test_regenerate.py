"""Answer regeneration: an OpenAI-compatible server started by the test, and multi-turn order."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import data_config, write_jsonl
from deepspec.config.data import RegenerateConfig
from deepspec.data.cache.reader import TargetCacheDataset
from deepspec.data.regenerate import OpenAIAnswerGenerator, regenerate_samples
from deepspec.data.sources import Sample
from deepspec.target import load_tokenizer
from deepspec.config.data import TargetConfig


def server_answer(messages: list[dict]) -> str:
    """The fake server's deterministic answer: depends on the whole conversation so far."""
    last = messages[-1]["content"]
    return f"answer {len(messages)} to: " + " ".join(reversed(last.split()))[:200]


class ChatServer:
    """A local /v1/chat/completions endpoint; fails the first ``fail_first`` requests with HTTP 500."""

    def __init__(self, fail_first: int = 0, always_fail_marker: str | None = None):
        self.requests: list[dict] = []
        self.fail_first, self.marker = fail_first, always_fail_marker
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, **body})
                fail = len(outer.requests) <= outer.fail_first or (outer.marker and outer.marker in body["messages"][-1]["content"])
                if fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": server_answer(body["messages"])}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = ChatServer(fail_first=2)
    yield s
    s.close()


def test_openai_backend_builds_cache_from_server_answers(tiny_target, tmp_path, server):
    rows = [{"turns": [f"write function number {i} please", f"now explain step {i} in detail"]} for i in range(6)]
    rows.append({"conversations": [{"role": "user", "content": "say hello to the world"},
                                   {"role": "assistant", "content": "an old answer that must be replaced"}]})
    inp = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = data_config(tiny_target, [inp], tmp_path / "cache", min_loss_tokens=1,
                      regenerate=RegenerateConfig(enabled=True, backend="openai", url=server.url, server_model="toy-server",
                                                  max_new_tokens=33, temperature=0.5, top_p=0.9, top_k=7, batch_size=3,
                                                  max_retries=3))
    from deepspec.data.build import build_cache

    manifest = build_cache(cfg)
    assert manifest["counts"]["samples"] == 7 and manifest["counts"]["regenerate_failed"] == 0
    body = server.requests[-1]
    assert body["path"] == "/v1/chat/completions"
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == ("toy-server", 33, 0.5, 0.9, 7)
    # 6 two-turn rows + 1 one-turn row, plus the 2 failed-then-retried requests
    assert len(server.requests) == 6 * 2 + 1 + 2
    # The second turn was asked after the model's own first answer.
    second = [r for r in server.requests if len(r["messages"]) == 3]
    assert second and all(r["messages"][1]["content"] == server_answer(r["messages"][:1]) for r in second)

    tok = load_tokenizer(TargetConfig(name_or_path=str(tiny_target)))
    texts = {}
    for s in TargetCacheDataset(tmp_path / "cache", shuffle=False, prefetch=0):
        ids, mask = s["input_ids"], s["loss_mask"].bool()
        texts[s["sample_id"]] = (tok.decode(ids), tok.decode(ids[mask]))
    full = "\n".join(t for t, _ in texts.values())
    assert "an old answer that must be replaced" not in full
    masked = "".join(m for _, m in texts.values())
    assert server_answer([{"role": "user", "content": "say hello to the world"}]) in masked


def test_resume_sends_no_request_twice(tmp_path, server):
    server.fail_first = 0
    cfg = RegenerateConfig(enabled=True, backend="openai", url=server.url, batch_size=2, max_retries=0)
    gen = OpenAIAnswerGenerator(cfg, "m")
    samples = [Sample(f"id{i}", i, "x:1", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(5)]
    done = tmp_path / "done.jsonl"
    first, failed = regenerate_samples(samples[:3], gen, done, batch_size=2, seed=0)
    assert failed == 0 and len(server.requests) == 3
    # Torn last line, as a SIGKILL mid-write leaves it: it is dropped and its row redone.
    data = done.read_bytes()
    done.write_bytes(data + b'{"id": "id3", "mess')
    again, failed = regenerate_samples(samples, gen, done, batch_size=2, seed=0)
    assert failed == 0
    assert len(server.requests) == 5  # ids 3 and 4 only; 0-2 come from the file
    assert [s.messages[-1]["content"] for s in again] == [server_answer(s.messages) for s in samples]
    assert [json.loads(l)["id"] for l in done.read_text().splitlines()] == [f"id{i}" for i in range(5)]


def test_server_failures_are_counted_not_fatal(tmp_path):
    srv = ChatServer(always_fail_marker="poison")
    try:
        cfg = RegenerateConfig(enabled=True, backend="openai", url=srv.url, batch_size=2, max_retries=1)
        gen = OpenAIAnswerGenerator(cfg, "m")
        samples = [Sample(f"id{i}", i, "x:1", messages=[{"role": "user", "content": "poison" if i == 1 else f"q {i}"}])
                   for i in range(3)]
        out, failed = regenerate_samples(samples, gen, tmp_path / "d.jsonl", batch_size=3, seed=0)
        assert failed == 1 and [s.sample_id for s in out] == ["id0", "id2"]
        assert any("500" in e for e in gen.errors)
    finally:
        srv.close()
