"""POST /v1/memory over HTTP next to a FastAPI hello world, measured with wrk.

    python benchmarks/http_speed.py [--rounds 5] [--duration-s 5] [--connections 8]
                                    [--threads 2] [--baseline DIR] [--write] [--note TEXT]

Goals: ``POST /v1/memory`` at >= 70% of the hello world's requests/s, with a p99 latency within
2x of the hello world's p99.

Two servers run at once, each one uvicorn process with the same settings (``memplan serve``'s:
one worker, the default event loop, uvicorn's h11 protocol with memplan's problem+json 400s, no
uvicorn access log):
- memplan: ``memplan serve --no-worker`` on SQLite in a temporary directory (bearer tokens on,
  JSON logs with one access line a request, to a file), as ``benchmarks/load.py`` starts it;
- hello world: ``GET /`` answering ``{"message": "Hello World"}`` from a bare ``FastAPI()``.

The estimate is the one a sweep makes: a known setup (gpt2, whose step template is compiled during
the warm-up) asked at a size; one row repeats the same body, the other cycles the micro-batch
size per request (a wrk Lua ``request`` hook), so each answer is a fresh template evaluation at a
size not asked just before. Rounds are interleaved: every round runs each row once, the order
rotating from round to round, and the table gives the median of the rounds. wrk's own latency
histogram gives p50 and p99 (a Lua ``done`` hook prints them with the request count); any
answer other than 200, or a socket error, is counted and fails the run.

``--baseline DIR`` runs a third server, ``memplan serve`` from another checkout of memplan (e.g.
a worktree of an earlier commit, sharing this one's environment), with the same settings: its two
``/v1/memory`` rows join the same interleaved rounds, so a change is measured before and after in
the same minutes. ``--write`` puts the table at the top of the results file as a dated section,
above the earlier ones.

``wrk`` is taken from PATH; when it is missing and this runs as root it is installed with
apt-get, otherwise the script says how to get it and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import TOKEN, _free_port, await_ready, start_server

GOAL_RPS_FRACTION = 0.70
GOAL_P99_FACTOR = 2.0
MEMORY = {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 8,
                                                    "sequence_length": 1024}}
CYCLED_BATCHES = list(range(2, 34))  # one size domain (batch >= 2): one compiled template
OUT = ROOT / "benchmarks" / "results" / "http-speed-cpu.md"

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"non_2xx": %d, "socket_errors": %d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def _lua_post(bodies: list[str]) -> str:
    """A wrk script POSTing ``bodies`` in turn (each wrk thread cycles on its own)."""
    items = ",\n  ".join(json.dumps(b) for b in bodies)  # a JSON string is a Lua string
    return f"""
local bodies = {{
  {items}
}}
local i = 0
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/memory", headers, bodies[i])
end
""" + _DONE


@dataclass
class Row:
    label: str
    server: str  # "hello" or "memplan"
    path: str
    script: str
    rps: list[float]
    p50_ms: list[float]
    p99_ms: list[float]
    cpu_us: list[float]  # server CPU time per request (user + system, all its threads)
    requests: int = 0
    failures: int = 0


# ---- the hello-world server --------------------------------------------------------------------
def serve_hello(port: int) -> None:
    """The FastAPI hello world, under the uvicorn settings ``memplan serve`` uses."""
    import uvicorn
    from fastapi import FastAPI

    from service.security import ProblemH11Protocol

    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"message": "Hello World"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", log_config=None,
                access_log=False, http=ProblemH11Protocol)


def start_hello(log_path: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, __file__, "--serve-hello", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    await_ready(proc, f"http://127.0.0.1:{port}/", "hello-world server", log_path)
    return proc, port


def _describe(root: Path) -> str:
    """A checkout by its commit (its folder's name when it is not a git checkout)."""
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    return f"commit {out.stdout.strip()}" if out.returncode == 0 else root.name


def start_baseline(root: Path, tmp: str) -> tuple[subprocess.Popen, int]:
    """``memplan serve`` from another checkout, as ``benchmarks.load.start_server`` starts this
    one's (same settings, its own database and log)."""

    from service.security import hash_token

    port = _free_port()
    env = {**os.environ, "MEMPLAN_API_TOKENS": hash_token(TOKEN),
           "MEMPLAN_MAX_QUEUED_PER_TOKEN": str(10**9), "MEMPLAN_LOG_FORMAT": "json",
           "PYTHONPATH": str(root)}
    log = open(f"{tmp}/baseline.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-worker",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--database-url", f"sqlite:///{tmp}/baseline.db"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    await_ready(proc, f"http://127.0.0.1:{port}/readyz", "baseline server", tmp)
    return proc, port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- wrk ---------------------------------------------------------------------------------------
def find_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        path = shutil.which("wrk")
        if path:
            return path
    raise SystemExit("this benchmark needs the wrk load generator (https://github.com/wg/wrk): "
                     "`apt-get install wrk` (Debian/Ubuntu), `brew install wrk` (macOS), or build "
                     "it from source and put it on PATH")


def run_wrk(wrk: str, url: str, script: str, duration_s: float, connections: int,
            threads: int) -> dict:
    out = subprocess.run([wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
                          "--timeout", "10s", "-s", script, url],
                         capture_output=True, text=True, timeout=duration_s + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            return json.loads(line[len("WRK_RESULT "):])
    raise SystemExit(f"wrk printed no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


def _post(url: str, body: dict) -> None:
    import httpx

    r = httpx.post(url, json=body, timeout=120)
    if r.status_code != 200:
        raise SystemExit(f"warm-up POST {url} answered {r.status_code}: {r.text[:500]}")


def _with_batch(b: int) -> dict:
    return {**MEMORY, "training": {**MEMORY["training"], "micro_batch_size": b}}


# ---- the run -----------------------------------------------------------------------------------
def measure(args: argparse.Namespace, wrk: str, tmp: str) -> list[Row]:
    scripts = Path(tmp)
    (scripts / "hello.lua").write_text(_DONE)
    (scripts / "same.lua").write_text(_lua_post([json.dumps(MEMORY)]))
    (scripts / "cycled.lua").write_text(
        _lua_post([json.dumps(_with_batch(b)) for b in CYCLED_BATCHES]))
    rows = [Row("hello world: GET /", "hello", "/", str(scripts / "hello.lua"), [], [], [], []),
            Row("POST /v1/memory, same body", "memplan", "/v1/memory",
                str(scripts / "same.lua"), [], [], [], []),
            Row(f"POST /v1/memory, micro-batch {CYCLED_BATCHES[0]}..{CYCLED_BATCHES[-1]} "
                "cycled", "memplan", "/v1/memory", str(scripts / "cycled.lua"), [], [], [], []),
            Row("memplan's GET /healthz (no goal: the same server's framework cost)", "memplan",
                "/healthz", str(scripts / "hello.lua"), [], [], [], [])]
    if args.baseline:
        rows += [Row(f"{row.label} (baseline: {_describe(args.baseline)})", "baseline", row.path,
                     row.script, [], [], [], []) for row in rows[1:3]]
    memplan, mport = start_server(f"sqlite:///{tmp}/jobs.db", f"{tmp}/memplan.log")
    hello, hport = start_hello(f"{tmp}/hello.log")
    procs = {"memplan": memplan, "hello": hello}
    if args.baseline:
        procs["baseline"], bport = start_baseline(args.baseline, tmp)
    ports = {"memplan": mport, "hello": hport, **({"baseline": bport} if args.baseline else {})}
    pids = {name: proc.pid for name, proc in procs.items()}
    try:
        # The setup's step template is compiled by its second size; then one short wrk run per
        # row warms both processes (imports, allocator, caches).
        for server in ("memplan", "baseline")[:1 + bool(args.baseline)]:
            for b in (MEMORY["training"]["micro_batch_size"], 4, *CYCLED_BATCHES):
                _post(f"http://127.0.0.1:{ports[server]}/v1/memory", _with_batch(b))
        for row in rows:
            run_wrk(wrk, f"http://127.0.0.1:{ports[row.server]}{row.path}", row.script,
                    min(2.0, args.duration_s), args.connections, args.threads)
        for r in range(args.rounds):
            for k in range(len(rows)):
                row = rows[(k + r) % len(rows)]  # rotate the order round by round
                cpu0 = cpu_seconds(pids[row.server])
                res = run_wrk(wrk, f"http://127.0.0.1:{ports[row.server]}{row.path}",
                              row.script, args.duration_s, args.connections, args.threads)
                row.cpu_us.append((cpu_seconds(pids[row.server]) - cpu0) / res["requests"] * 1e6)
                row.rps.append(res["requests"] / (res["duration_us"] / 1e6))
                row.p50_ms.append(res["p50_us"] / 1e3)
                row.p99_ms.append(res["p99_us"] / 1e3)
                row.requests += res["requests"]
                row.failures += res["non_2xx"] + res["socket_errors"]
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{row.server} {row.path} {row.rps[-1]:.0f} req/s" for row in rows),
                file=sys.stderr)
    finally:
        for proc in procs.values():
            _stop(proc)
    return rows


def table(rows: list[Row], args: argparse.Namespace) -> tuple[str, bool]:
    hello = rows[0]
    h_rps, h_p99, h_cpu = (statistics.median(v) for v in (hello.rps, hello.p99_ms, hello.cpu_us))
    servers = "All three servers" if args.baseline else "Both servers"
    lines = [(f"wrk {args.threads} threads, {args.connections} keep-alive connections, "
              f"{args.duration_s:g} s a run, {args.rounds} interleaved rounds (median of rounds; "
              f"spread = min..max of the rounds). {servers} up at once, one uvicorn process "
              f"each (asyncio loop, h11). {os.cpu_count()} CPUs shared by the servers and wrk; "
              f"Python {platform.python_version()}. CPU µs/req: the server process's user + "
              "system time per request; hello's CPU over a row's is the req/s fraction the row "
              "would reach with a core to itself (steadier than req/s on a shared machine)."
              + (f" Baseline rows: `memplan serve` of {_describe(args.baseline)}, same "
                 "settings (no goal)."
                 if args.baseline else "")), "",
             ("| row | req/s | spread | p50 ms | p99 ms | req/s vs hello | p99 vs hello | "
              "CPU µs/req | CPU: hello / row | requests | failed |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    met = all(r.failures == 0 for r in rows)
    for row in rows:
        rps, p50, p99, cpu = (statistics.median(v) for v in (row.rps, row.p50_ms, row.p99_ms,
                                                             row.cpu_us))
        frac, factor = rps / h_rps, p99 / h_p99
        if row is hello:
            vs_rps = vs_p99 = vs_cpu = "-"
        elif row.path == "/healthz" or row.server == "baseline":
            vs_rps, vs_p99, vs_cpu = f"{frac:.0%}", f"{factor:.2f}x", f"{h_cpu / cpu:.0%}"
        else:
            ok_rps, ok_p99 = frac >= GOAL_RPS_FRACTION, factor <= GOAL_P99_FACTOR
            met = met and ok_rps and ok_p99
            vs_rps = f"{frac:.0%} ({'met' if ok_rps else 'NOT met'})"
            vs_p99 = f"{factor:.2f}x ({'met' if ok_p99 else 'NOT met'})"
            vs_cpu = f"{h_cpu / cpu:.0%}"
        lines.append(f"| {row.label} | {rps:.0f} | {min(row.rps):.0f}..{max(row.rps):.0f} | "
                     f"{p50:.2f} | {p99:.2f} | {vs_rps} | {vs_p99} | {cpu:.0f} | {vs_cpu} | "
                     f"{row.requests} | {row.failures} |")
    lines += ["", (f"Goals: req/s >= {GOAL_RPS_FRACTION:.0%} of the hello world's, p99 <= "
                   f"{GOAL_P99_FACTOR:g}x the hello world's: {'met' if met else 'NOT met'}.")]
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration-s", type=float, default=5.0, help="seconds a wrk run")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="another memplan checkout whose server joins the rounds (before/after)")
    ap.add_argument("--write", action="store_true",
                    help=f"put the table at the top of {OUT.relative_to(ROOT)} (a dated section)")
    ap.add_argument("--note", default="", help="a line added under the table (with --write)")
    ap.add_argument("--serve-hello", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_hello:
        serve_hello(args.serve_hello)
        return 0
    wrk = find_wrk()
    tmp = tempfile.mkdtemp(prefix="memplan-http-speed-")
    rows = measure(args, wrk, tmp)
    text, met = table(rows, args)
    print(text)
    if args.write:
        version = subprocess.run([wrk, "--version"], capture_output=True, text=True,
                                 check=False).stdout
        version = (version.splitlines() or ["wrk"])[0].split("[")[0].strip()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        title = "# HTTP speed: POST /v1/memory next to a FastAPI hello world (wrk)\n"
        earlier = OUT.read_text() if OUT.exists() else ""
        earlier = earlier[len(title):].lstrip("\n") if earlier.startswith(title) else earlier
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python benchmarks/http_speed.py --write" + (
            " --baseline DIR" if args.baseline else "")
        OUT.write_text(f"{title}\n## {when}\n\n`{command}` ({version}).\n\n{text}\n"
                       + (f"\n{args.note}\n" if args.note else "")
                       + (f"\n{earlier}" if earlier else ""))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
