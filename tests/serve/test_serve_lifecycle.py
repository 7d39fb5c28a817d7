"""Process lifecycle: SIGTERM drains with zero dropped requests; /health catches a stalled engine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from serve_helpers import RunningServer, free_port, serve_config


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server not ready")


def test_sigterm_drains_in_flight_streams_and_refuses_new_requests(model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "neox_runtime.serve.cli", "--model", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "2",
                             "--drain-grace-seconds", "60"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "server.log", "wb"))
    try:
        wait_ready(url, proc)
        results: dict[int, dict] = {}
        started = threading.Barrier(11)  # 10 streams with response headers + the test

        def stream(i: int) -> None:
            body = {"prompt": f"the model {i}", "max_tokens": 200, "ignore_eos": True, "stream": True}
            text, finish, done = "", None, False
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                started.wait(30)
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        text, finish = text + choice["text"], choice["finish_reason"] or finish
            results[i] = {"status": r.status_code, "finish": finish, "done": done}

        def plain(i: int) -> None:
            r = httpx.post(url + "/v1/completions", timeout=120,
                           json={"prompt": "the", "max_tokens": 200, "ignore_eos": True})
            results[i] = {"status": r.status_code, "finish": r.json()["choices"][0]["finish_reason"], "done": True}

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(10)]
        threads += [threading.Thread(target=plain, args=(i,)) for i in range(10, 12)]
        for t in threads:
            t.start()
        started.wait(30)  # every stream is in flight (2 slots: most of them are still waiting)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert httpx.get(url + "/ready", timeout=5).status_code == 503
        refused = httpx.post(url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        for t in threads:
            t.join(timeout=120)
        assert sorted(results) == list(range(12))
        assert all(r == {"status": 200, "finish": "length", "done": True} for r in results.values()), results
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


class SlowProcessor:
    """A logits processor that blocks the engine once, as a hung kernel would."""

    def __init__(self, seconds: float):
        self.seconds, self.fired = seconds, threading.Event()

    def __call__(self, logits, seqs):
        if not self.fired.is_set():
            self.fired.set()
            time.sleep(self.seconds)
        return logits


def test_health_fails_while_the_engine_makes_no_token_progress(model_dir):
    cfg = serve_config(model_dir)
    cfg.health_stall_seconds = 0.5
    srv = RunningServer(cfg)
    try:
        slow = SlowProcessor(2.5)
        srv.state.engine.engine.sampler.processors.append(slow)
        assert httpx.get(srv.url + "/health").status_code == 200
        t = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", timeout=30,
                                                       json={"prompt": "the", "max_tokens": 3}))
        t.start()
        assert slow.fired.wait(10)
        time.sleep(1.0)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "no token progress" in r.json()["reason"]
        t.join(timeout=30)
        assert httpx.get(srv.url + "/health").status_code == 200  # progress resumed
    finally:
        srv.stop()
