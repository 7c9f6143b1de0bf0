"""Shared helpers: the main server started by run.sh, and extra servers a test starts
with its own flags. Every wait here is bounded."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

BIN = os.environ["DSV2_BIN"]
MODEL = os.environ["DSV2_MODEL"]
URL = os.environ["DSV2_URL"]
WORK = os.environ["DSV2_WORK"]
MODEL_NAME = os.path.basename(MODEL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=30):
    """A plain HTTP request: returns (status, headers, body bytes), errors included."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metrics(url=URL):
    """The Prometheus samples without labels, as floats, plus the raw text."""
    _, _, body = http("GET", url + "/metrics")
    text = body.decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values, text


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def client(url=URL, api_key="unused", timeout=60):
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)


class Server:
    """A `dsv2 serve` process of a test's own; stopped at teardown."""

    def __init__(self, args=(), env=None, model=MODEL):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(WORK, f"server-{self.port}.log")
        self.log = open(self.log_path, "wb")
        cmd = [BIN, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "f32", *args]
        if "--kv-cache-memory" not in args:
            cmd += ["--kv-cache-memory", "64MiB"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.wait_healthy()

    def wait_healthy(self, timeout=60):
        def healthy():
            assert self.proc.poll() is None, f"server exited early: {self.read_log()}"
            try:
                return http("GET", self.url + "/health", timeout=1)[0] == 200
            except OSError:
                return False
        wait_for(healthy, timeout, 0.1, "the server to be healthy")

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def start_server():
    servers = []

    def start(*args, env=None, model=MODEL):
        s = Server(args, env, model)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
