"""Sustained load on a real uvicorn server: requests/s, p50/p99 latency and errors per route.

    python benchmarks/load.py [--duration-s 60] [--connections 16] [--database-url URL]
                              [--out benchmarks/results/load-cpu.md]

Starts ``memplan serve --no-worker`` (one uvicorn process, bearer tokens on, JSON logs to a file)
and drives each route in turn for the duration with keep-alive connections from a small raw
HTTP/1.1 client (asyncio streams: it costs far less CPU per request than an HTTP library, so the
server, not the client, is what is measured). ``GET /healthz`` is the ceiling: the same stack
with no work in the handler. An error is any answer other than the route's success status, or a
failed connection. Job submission fills the queue (no worker runs), so the queued-jobs cap is
raised for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "load-benchmark-token"
JOB = {"model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                 "vocab_size": 256, "max_sequence_length": 64},
       "training": {"precision": "fp32", "sequence_length": 32}, "device": "cpu", "steps": 3}
MEMORY = {"model": {"preset": "llama-2-7b"},
          "training": {"precision": "mixed-bf16", "micro_batch_size": 1,
                       "sequence_length": 4096},
          "hardware": {"gpu": "h100-80gb"}}


@dataclass
class Route:
    label: str
    method: str
    path: str
    body: dict | None
    ok: int
    auth: bool = False


ROUTES = [Route("GET /healthz (ceiling)", "GET", "/healthz", None, 200),
          Route("POST /v1/memory", "POST", "/v1/memory", MEMORY, 200),
          Route("POST /v1/validations", "POST", "/v1/validations", JOB, 202, auth=True)]


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def _request_bytes(route: Route, port: int) -> bytes:
    body = json.dumps(route.body).encode() if route.body is not None else b""
    head = [f"{route.method} {route.path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if route.auth:
        head.append(f"Authorization: Bearer {TOKEN}")
    if route.body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _connection(route: Route, port: int, deadline: float, tally: Tally) -> None:
    payload = _request_bytes(route, port)
    reader = writer = None
    while time.perf_counter() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = time.perf_counter()
            writer.write(payload)
            status_line = await reader.readline()
            status = int(status_line.split()[1])
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and value.strip().lower() == "close":
                    close = True
            await reader.readexactly(length)
            tally.latencies_s.append(time.perf_counter() - start)
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if status != route.ok:
                tally.errors += 1
            if close:
                writer.close()
                writer = None
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            tally.errors += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def drive(route: Route, port: int, duration_s: float, connections: int) -> tuple[Tally,
                                                                                       float]:
    tally = Tally()
    start = time.perf_counter()
    deadline = start + duration_s
    await asyncio.gather(*(_connection(route, port, deadline, tally) for _ in range(connections)))
    return tally, time.perf_counter() - start


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(database_url: str, log_path: str) -> tuple[subprocess.Popen, int]:
    from service.security import hash_token

    port = _free_port()
    env = {**os.environ, "MEMPLAN_API_TOKENS": hash_token(TOKEN),
           "MEMPLAN_MAX_QUEUED_PER_TOKEN": str(10**9), "MEMPLAN_LOG_FORMAT": "json",
           "PYTHONPATH": str(ROOT)}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-worker",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--database-url", database_url],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    await_ready(proc, f"http://127.0.0.1:{port}/readyz", "server", log_path)
    return proc, port


def await_ready(proc: subprocess.Popen, url: str, name: str, see: str) -> None:
    """Wait up to 60 s for ``url`` to answer 200; exits (``SystemExit``) when the server process
    ends first or the time runs out (``see``: where its output went)."""
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; see {see}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"{name} did not become ready in 60 s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--database-url", help="default: a fresh SQLite file")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="memplan-load-")
    url = args.database_url or f"sqlite:///{tmp}/jobs.db"
    proc, port = start_server(url, f"{tmp}/server.log")
    rows = []
    try:
        for route in ROUTES:
            asyncio.run(drive(route, port, min(2.0, args.duration_s), 4))  # warm-up
            tally, elapsed = asyncio.run(drive(route, port, args.duration_s, args.connections))
            lat = sorted(tally.latencies_s)
            rows.append((route.label, len(lat), len(lat) / elapsed, _percentile(lat, 0.5) * 1e3,
                         _percentile(lat, 0.99) * 1e3, tally.errors,
                         ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items()))))
            print(f"{route.label}: {rows[-1][2]:.0f} req/s", file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

    backend = url.split(":", 1)[0].split("+")[0]
    lines = [f"Sustained load, {args.duration_s:g} s per route, {args.connections} keep-alive "
             f"connections; one uvicorn process (`memplan serve --no-worker`), job store "
             f"{backend}, bearer tokens on, JSON access logs to a file. {os.cpu_count()} CPUs "
             f"shared by server and client; Python {platform.python_version()}.", "",
             "| route | requests | req/s | p50 ms | p99 ms | errors | statuses |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]} | {r[6]} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0 if all(r[5] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
