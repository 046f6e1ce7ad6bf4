"""Relay benchmark: consoleproxy against websockify 0.13.0 and raw TCP, side by side in one run.

Scenarios (issue 8): 1 one console streaming down, 2 one console sending up in 64 KiB messages,
3 keystroke round trips through an echo backend, 4 N idle consoles (PSS per console in a freshly
started proxy, time to open them), 5 100 consoles streaming at once, 6 new TLS consoles per second.

Each proxy runs in its own process; its CPU (user + system, summed over its process tree and its
reaped children) and PSS are read from /proc. Clients and the backend are separate processes
(relay_parts.py); each client reports its own CPU so a client-bound figure can be recognised.

``--quick`` runs every scenario with tiny sizes (the smoke test in tests/test_bench_smoke.py).
Writes bench/results/relay_*.json, relay.png and relay_table.md, and puts the table in README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import relay_parts as parts  # noqa: E402

PY = sys.executable
BIN = Path(PY).parent
GIB = 1 << 30
MIB = 1 << 20


@dataclass
class Sizes:
    down: int = 512 * MIB
    up: int = 128 * MIB
    up_msg: int = 64 * 1024
    rtt: int = 2000
    reps: int = 3
    rtt_reps: int = 5  # round trips depend on where the scheduler puts three processes: more runs
    idle: tuple[int, ...] = (1000, 10000)
    idle_tls: int = 10000
    idle_wsfy: int = 1000
    multi: int = 100
    multi_size: int = 8 * MIB
    open_seq: int = 200
    open_par: int = 1000
    open_seq_wsfy: int = 100
    open_par_wsfy: int = 300


QUICK = Sizes(
    down=4 * MIB, up=2 * MIB, rtt=50, reps=1, rtt_reps=1, idle=(20,), idle_tls=10, idle_wsfy=10,
    multi=4, multi_size=1 * MIB, open_seq=5, open_par=10, open_seq_wsfy=5, open_par_wsfy=10,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout} s")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Env:
    work: Path
    backend_port: int
    keyring: Path
    store: Path
    cafile: Path
    chain: Path
    key: Path
    tokens: Path
    loop_option: bool
    workers_option: bool
    logs: Path
    uvloop: bool = False  # installed: serve's default loop is uvloop
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)


def make_env(work: Path, logs: Path) -> Env:
    from consoleproxy.policy.tokens import Keyring
    from consoleproxy.tls.certstore import CertStore
    from consoleproxy.tls.devcert import ensure_dev_certificate

    keyring = work / "keys.json"
    Keyring.generate().save(keyring)
    store = work / "certs"
    cafile = ensure_dev_certificate(store)
    paths = CertStore(store).live_paths()
    assert paths is not None
    chain, key = paths
    port = free_port()
    tokens = work / "tokens.txt"
    tokens.write_text(f"bench: 127.0.0.1:{port}\n")
    helptext = subprocess.run(
        [PY, "-m", "consoleproxy", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    uvloop = subprocess.run([PY, "-c", "import uvloop"], capture_output=True).returncode == 0
    return Env(work, port, keyring, store, cafile, chain, key, tokens,
               "--loop" in helptext, "--workers" in helptext, logs, uvloop)


@contextlib.contextmanager
def backend(env: Env) -> Iterator[None]:
    proc = subprocess.Popen(
        [PY, str(HERE / "relay_parts.py"), "backend", "--port", str(env.backend_port)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("backend did not start")
        yield
    finally:
        stop(proc)


@dataclass
class Proxy:
    name: str  # "consoleproxy" | "websockify" | "raw"
    tls: bool
    proc: subprocess.Popen[Any] | None
    port: int
    label: str

    def target(self, env: Env) -> dict[str, Any]:
        if self.name == "raw":
            return {"kind": "tcp", "host": "127.0.0.1", "port": env.backend_port}
        t: dict[str, Any] = {"kind": "ws", "host": "127.0.0.1", "port": self.port, "tls": self.tls,
                             "cafile": str(env.cafile), "backend_port": env.backend_port}
        if self.name == "consoleproxy":
            t["keyring"] = str(env.keyring)
        else:
            t["token"] = "bench"  # noqa: S105 - websockify token-file entry, not a secret
        return t

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def consoleproxy_config(env: Env, port: int, tls: bool) -> Path:
    # Per-IP limits off: every bench client comes from 127.0.0.1 (websockify has no such limits).
    text = f"""
[listen]
address = "127.0.0.1"
ports = [{port}]
tls = {"true" if tls else "false"}

[admin]
address = "127.0.0.1"
port = 0
key_file = "{env.work / "admin.key"}"

[tls]
store = "{env.store}"

[tokens]
keyring = "{env.keyring}"

[targets]
allowed_cidrs = ["127.0.0.1/32"]
ports = "1-65535"

[limits]
max_sessions = 30000
max_sessions_per_client_ip = 0
max_handshakes_per_ip = 0
connections_per_ip_per_second = 0
max_concurrent_handshakes = 5000
handshake_timeout_seconds = 60
request_head_timeout_seconds = 60

[log]
level = "warning"
"""
    path = env.work / f"consoleproxy-{port}.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def proxy(env: Env, name: str, tls: bool, *, workers: int = 1, loop: str = "") -> Iterator[Proxy]:
    """``loop``: "" runs ``serve`` without ``--loop`` (its default, what operators get)."""
    label = f"{name}{' TLS' if tls else ''}"
    if name == "raw":
        yield Proxy("raw", False, None, env.backend_port, "raw TCP")
        return
    port = free_port()
    env.logs.mkdir(parents=True, exist_ok=True)
    log = open(env.logs / f"{label.replace(' ', '-')}-{port}.log", "w")
    if name == "consoleproxy":
        argv = [PY, "-m", "consoleproxy", "serve", "--config", str(consoleproxy_config(env, port, tls))]
        if workers > 1:
            argv += ["--workers", str(workers)]
            label += f" {workers}w"
        if loop and env.loop_option:
            argv += ["--loop", loop]
            label += f" {loop}"
    else:
        argv = [str(BIN / "websockify"), "--token-plugin", "TokenFile", "--token-source", str(env.tokens)]
        if tls:
            argv += ["--cert", str(env.chain), "--key", str(env.key), "--ssl-only"]
        argv += [f"127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, proc)
        if workers > 1:  # every worker must be listening before the clients start
            deadline = time.monotonic() + 30
            while parts.tree_size(proc.pid) < workers + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
        yield Proxy(name, tls, proc, port, label)
    finally:
        stop(proc)
        log.close()


def client(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, str(HERE / "relay_parts.py"), "client", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def run_clients(
    p: Proxy, env: Env, op: str, argsets: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float, float]:
    """Run one client process per argument set at once; returns results, proxy CPU s, wall s."""
    cpu0 = parts.tree_cpu_seconds(p.pid) if p.proc else 0.0
    t0 = time.perf_counter()
    procs = [client({"target": p.target(env), "op": op, "args": a}) for a in argsets]
    results = []
    for c in procs:
        out, _ = c.communicate(timeout=600)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if c.returncode or not lines:
            raise RuntimeError(f"client {op} against {p.label} failed (exit {c.returncode}): {out[-500:]}")
        results.append(json.loads(lines[-1]))
    wall = time.perf_counter() - t0
    cpu = (parts.tree_cpu_seconds(p.pid) - cpu0) if p.proc else 0.0
    return results, cpu, wall


def med(values: list[float]) -> float:
    return statistics.median(values)


# --- scenarios -------------------------------------------------------------------------------


def stream(env: Env, p: Proxy, op: str, sz: Sizes, rate: float = 0.0) -> dict[str, Any]:
    """Scenario 1 (down) or 2 (up): median of ``reps`` runs of MB/s and CPU s per GiB (down:
    paced at ``rate`` bytes per second if given)."""
    runs = []
    for _ in range(sz.reps):
        args: dict[str, Any] = {"size": sz.down} if op == "down" else {"size": sz.up, "msg": sz.up_msg}
        if rate:
            args["rate"] = rate
        (res,), cpu, _ = run_clients(p, env, op, [args])
        runs.append({"mb_s": res["mb_s"], "cpu_s_per_gib": cpu / (res["bytes"] / GIB) if p.proc else None,
                     "client_cpu_s_per_gib": res["client_cpu_s"] / (res["bytes"] / GIB)})
    out: dict[str, Any] = {"runs": runs, "mb_s": med([r["mb_s"] for r in runs]),
                           "client_cpu_s_per_gib": med([r["client_cpu_s_per_gib"] for r in runs])}
    out["cpu_s_per_gib"] = med([r["cpu_s_per_gib"] for r in runs]) if p.proc else None
    return out


def rtt(env: Env, p: Proxy, sz: Sizes) -> dict[str, Any]:
    runs = [run_clients(p, env, "rtt", [{"count": sz.rtt}])[0][0] for _ in range(sz.rtt_reps)]
    return {k: med([r[k] for r in runs]) for k in ("p50_us", "p99_us", "max_us")} | {"runs": runs}


def idle(env: Env, p: Proxy, n: int) -> dict[str, Any]:
    """Scenario 4 in a freshly started proxy: PSS growth per console and time to open them all."""
    time.sleep(0.5)
    pss0 = parts.tree_pss_kib(p.pid)
    nproc = 2 if n >= 100 else 1
    per = [n // nproc + (1 if i < n % nproc else 0) for i in range(nproc)]
    first = [sum(per[:i]) for i in range(nproc)]
    t0 = time.perf_counter()
    procs = [client({"target": p.target(env), "op": "idle",
                     "args": {"n": k, "parallel": 64, "first": f}}) for k, f in zip(per, first, strict=True)]
    reports = []
    for c in procs:
        assert c.stdout is not None
        line = c.stdout.readline()
        if not line:
            raise RuntimeError(f"idle client against {p.label} died")
        reports.append(json.loads(line))
    seconds = time.perf_counter() - t0
    time.sleep(1.0)  # let the last handshakes settle into the relay
    pss1 = parts.tree_pss_kib(p.pid)
    nprocs = parts.tree_size(p.pid)
    for c in procs:
        assert c.stdin is not None
        c.stdin.write("close\n")
        c.stdin.flush()
    for c in procs:
        c.communicate(timeout=120)
    opened = sum(r["opened"] for r in reports)
    errors = sorted({e for r in reports for e in r["errors"]})[:5]
    return {
        "asked": n, "opened": opened, "failed": n - opened, "errors": errors, "seconds": seconds,
        "consoles_per_s": opened / seconds if seconds else 0.0, "processes": nprocs,
        "pss_before_kib": pss0, "pss_after_kib": pss1,
        "pss_per_console_kib": (pss1 - pss0) / opened if opened else None,
    }


def multi(env: Env, p: Proxy, sz: Sizes) -> dict[str, Any]:
    (res,), cpu, _ = run_clients(p, env, "multi_down", [{"n": sz.multi, "size": sz.multi_size, "first": 0}])
    rates = res["rates"]
    return {
        "consoles": sz.multi, "mb_s": res["bytes"] / res["seconds"] / 1e6,
        "cpu_s_per_gib": cpu / (res["bytes"] / GIB),
        "fairness": min(rates) / max(rates), "client_cpu_s": res["client_cpu_s"],
        "rate_p10_p50_p90": [statistics.quantiles(rates, n=10)[i] for i in (0, 4, 8)] if rates[1:] else [],
    }


def opens(env: Env, p: Proxy, n: int, parallel: int) -> dict[str, Any]:
    nproc = 2 if parallel > 1 else 1
    argsets = [{"n": n // nproc, "parallel": max(parallel // nproc, 1), "first": i * n} for i in range(nproc)]
    res, cpu, _ = run_clients(p, env, "open", argsets)
    opened = sum(r["opened"] for r in res)
    return {
        "asked": n, "opened": opened, "failed": sum(r["failed"] for r in res),
        "errors": sorted({e for r in res for e in r["errors"]})[:5],
        "per_s": opened / max(r["seconds"] for r in res), "proxy_cpu_s": cpu,
        "client_cpu_s": sum(r["client_cpu_s"] for r in res),
    }


# --- the run ---------------------------------------------------------------------------------


def run_all(sz: Sizes, out_dir: Path, *, other_loop: bool) -> dict[str, Any]:
    parts.raise_nofile()
    results: dict[str, Any] = {"sizes": sz.__dict__ | {"idle": list(sz.idle)},
                               "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        env = make_env(Path(tmp), out_dir / "logs")
        results["workers_option"] = env.workers_option
        results["loop_option"] = env.loop_option
        results["default_loop"] = "uvloop" if env.uvloop else "asyncio"
        configs: list[tuple[str, bool, dict[str, Any]]] = [
            ("raw", False, {}), ("consoleproxy", False, {}), ("websockify", False, {}),
            ("consoleproxy", True, {}), ("websockify", True, {}),
        ]
        if other_loop and env.loop_option and env.uvloop:
            # serve's default is uvloop when installed: measure plain asyncio beside it.
            configs.insert(2, ("consoleproxy", False, {"loop": "asyncio"}))
            configs.insert(5, ("consoleproxy", True, {"loop": "asyncio"}))
        with backend(env):
            # 1-3: throughput each way and latency, fresh proxy per configuration.
            for key, op in (("down", "down"), ("up", "up"), ("rtt", "rtt")):
                section: dict[str, Any] = {}
                for name, tls, kw in configs:
                    if (name == "raw" or op == "rtt") and tls:
                        continue  # the table compares round trips over plain WebSocket
                    with proxy(env, name, tls, **kw) as p:
                        print(f"  {key}: {p.label}", flush=True)
                        try:
                            section[p.label] = rtt(env, p, sz) if op == "rtt" else stream(env, p, op, sz)
                        except RuntimeError as exc:  # reported in the JSON and the table, not hidden
                            if name == "consoleproxy" and not kw:
                                raise
                            print(f"    FAILED: {exc}", flush=True)
                            section[p.label] = {"error": str(exc)[:300]}
                results[key] = section
                save(out_dir, key, section)
            # 4: idle consoles, each count in a freshly started proxy.
            section = {}
            plans: list[tuple[str, bool, int, int]] = [("consoleproxy", False, n, 1) for n in sz.idle]
            plans += [("consoleproxy", True, sz.idle_tls, 1), ("websockify", False, sz.idle_wsfy, 1),
                      ("websockify", True, sz.idle_wsfy, 1)]
            for name, tls, n, workers in plans:
                # One process holds two sockets per console; past the open-files limit use 2 workers.
                if name == "consoleproxy" and 2 * n + 100 > parts.raise_nofile():
                    workers = 2 if env.workers_option else 1
                with proxy(env, name, tls, workers=workers) as p:
                    print(f"  idle {n}: {p.label}", flush=True)
                    section[f"{p.label} x{n}"] = idle(env, p, n) | {"workers": workers}
            results["idle"] = section
            save(out_dir, "idle", section)
            # 5: many consoles streaming at once.
            section = {}
            for name in ("consoleproxy", "websockify"):
                with proxy(env, name, False) as p:
                    print(f"  multi: {p.label}", flush=True)
                    section[p.label] = multi(env, p, sz)
            results["multi"] = section
            save(out_dir, "multi", section)
            # 6: new TLS consoles per second, sequential and 32 in parallel.
            section = {}
            plans6: list[tuple[str, int]] = [("consoleproxy", 1), ("websockify", 1)]
            if env.workers_option:
                plans6.insert(1, ("consoleproxy", 2))
            for name, workers in plans6:
                with proxy(env, name, True, workers=workers) as p:
                    print(f"  open: {p.label}", flush=True)
                    wsfy = name == "websockify"
                    section[p.label] = {
                        "sequential": opens(env, p, sz.open_seq_wsfy if wsfy else sz.open_seq, 1),
                        "parallel32": opens(env, p, sz.open_par_wsfy if wsfy else sz.open_par, 32),
                    }
            results["open"] = section
            save(out_dir, "open", section)
    return results


def save(out_dir: Path, key: str, data: Any) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"relay_{key}.json").write_text(json.dumps(data, indent=2) + "\n")


# --- report ----------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _get(d: dict[str, Any], *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, holds) for each goal of issue 8."""
    out: list[tuple[str, str, bool | None]] = []

    def check(goal: str, ours: float | None, theirs: float | None, limit: float, le: bool) -> None:
        if ours is None or not theirs:
            out.append((goal, "not measured", None))
            return
        ratio = ours / theirs
        out.append((goal, f"{ratio:.2f}x", ratio <= limit if le else ratio >= limit))

    for tls, down_cpu, up_cpu, down_tp, up_tp in ((False, 0.6, 0.2, 1.2, 4.0), (True, 1.0, 0.4, 1.0, 2.0)):
        sfx = " TLS" if tls else ""
        kind = "TLS" if tls else "plain"
        cp, ws = f"consoleproxy{sfx}", f"websockify{sfx}"
        check(f"CPU/GiB down {kind} <= {down_cpu}x websockify", _get(r, "down", cp, "cpu_s_per_gib"),
              _get(r, "down", ws, "cpu_s_per_gib"), down_cpu, True)
        check(f"CPU/GiB up {kind} <= {up_cpu}x websockify", _get(r, "up", cp, "cpu_s_per_gib"),
              _get(r, "up", ws, "cpu_s_per_gib"), up_cpu, True)
        check(f"MB/s down {kind} >= {down_tp}x websockify", _get(r, "down", cp, "mb_s"),
              _get(r, "down", ws, "mb_s"), down_tp, False)
        check(f"MB/s up {kind} >= {up_tp}x websockify", _get(r, "up", cp, "mb_s"),
              _get(r, "up", ws, "mb_s"), up_tp, False)
    idle = r.get("idle", {})
    for tls, limit in ((False, 8.0), (True, 64.0)):
        keys = [k for k in idle if k.startswith("consoleproxy") and ("TLS" in k) == tls]
        if keys:
            k = max(keys, key=lambda k: idle[k]["asked"])
            v = idle[k]["pss_per_console_kib"]
            measured = f"{v:.1f} KiB ({k})" if v is not None else "none opened"
            out.append((f"PSS per idle console {'TLS' if tls else 'plain'} <= {limit:g} KiB",
                        measured, v is not None and v <= limit))
    raw = _get(r, "rtt", "raw TCP", "p50_us")
    cp, ws = _get(r, "rtt", "consoleproxy", "p50_us"), _get(r, "rtt", "websockify", "p50_us")
    if None not in (raw, cp, ws):
        check("added RTT p50 <= 0.5x websockify's", cp - raw, ws - raw, 0.5, True)
    opened = r.get("open", {})
    best = max((v["parallel32"]["per_s"] for k, v in opened.items() if k.startswith("consoleproxy")),
               default=None)
    out.append(("new TLS consoles/s >= 500", f"{best:.0f}/s" if best else "not measured",
                None if best is None else best >= 500))
    return out


def table(r: dict[str, Any]) -> str:
    lines = ["| scenario | configuration | consoleproxy | websockify | ratio (ours / theirs) | notes |",
             "|---|---|---|---|---|---|"]

    def row(scn: str, cfg: str, ours: float | None, theirs: float | None, fmt: str, note: str = "") -> None:
        def f(v: float | None) -> str:
            return fmt.format(v) if v is not None else "n/a"

        lines.append(f"| {scn} | {cfg} | {f(ours)} | {f(theirs)} | {_ratio(ours, theirs)} | {note} |")

    for key, scn in (("down", "1 down 1 console"), ("up", "2 up 64 KiB msgs")):
        sec = r.get(key, {})
        raw = _get(sec, "raw TCP", "mb_s")
        for sfx in ("", " TLS"):
            cp, ws = sec.get(f"consoleproxy{sfx}", {}), sec.get(f"websockify{sfx}", {})
            cl = max(cp.get("client_cpu_s_per_gib") or 0, ws.get("client_cpu_s_per_gib") or 0)
            note = f"raw TCP {raw:.0f} MB/s; client CPU <= {cl:.2f} s/GiB" if raw else ""
            alt = sec.get(f"consoleproxy{sfx} asyncio")
            if alt and "mb_s" in alt:
                note += f"; ours on asyncio's loop {alt['mb_s']:.0f} MB/s, {alt['cpu_s_per_gib']:.2f} s/GiB"
            row(scn, f"MB/s{sfx or ' plain'}", cp.get("mb_s"), ws.get("mb_s"), "{:.0f}", note)
            cpu_label = f"CPU s/GiB{sfx or ' plain'}"
            row(scn, cpu_label, cp.get("cpu_s_per_gib"), ws.get("cpu_s_per_gib"), "{:.2f}")
    sec = r.get("rtt", {})
    raw = _get(sec, "raw TCP", "p50_us")
    for stat in ("p50_us", "p99_us", "max_us"):
        row("3 RTT 64 B", f"{stat[:-3]} µs", _get(sec, "consoleproxy", stat), _get(sec, "websockify", stat),
            "{:.0f}", f"raw TCP {_get(sec, 'raw TCP', stat):.0f} µs" if raw else "")
    if raw:
        a, b = _get(sec, "consoleproxy", "p50_us"), _get(sec, "websockify", "p50_us")
        if a is not None and b is not None:
            row("3 RTT 64 B", "added p50 µs", a - raw, b - raw, "{:.0f}")
        alt = sec.get("consoleproxy asyncio")
        if alt and "p50_us" in alt and a is not None:
            lines[-1] = lines[-1][:-2] + f"ours on asyncio's loop {alt['p50_us'] - raw:.0f} µs |"
    idle = r.get("idle", {})
    for tls in (False, True):
        ws = next((v for k, v in idle.items() if k.startswith("websockify") and ("TLS" in k) == tls), None)
        for k, v in idle.items():
            if not k.startswith("consoleproxy") or ("TLS" in k) != tls:
                continue
            note = f"{v['opened']}/{v['asked']} opened in {v['seconds']:.1f} s"
            if ws:
                note += (f"; websockify {ws['opened']}/{ws['asked']} in {ws['seconds']:.1f} s, "
                         f"{ws['processes']} processes")
                if ws["failed"]:
                    note += f", errors: {'; '.join(ws['errors'])[:120]}"
            row("4 idle consoles", f"PSS KiB/console{' TLS' if tls else ''} x{v['asked']}",
                v["pss_per_console_kib"], ws["pss_per_console_kib"] if ws else None, "{:.1f}", note)
            row("4 idle consoles", f"opened/s{' TLS' if tls else ''} x{v['asked']}",
                v["consoles_per_s"], ws["consoles_per_s"] if ws else None, "{:.0f}")
    sec = r.get("multi", {})
    cp, ws = sec.get("consoleproxy", {}), sec.get("websockify", {})
    n = cp.get("consoles", "?")
    row(f"5 {n} consoles down", "aggregate MB/s", cp.get("mb_s"), ws.get("mb_s"), "{:.0f}",
        f"client CPU {cp.get('client_cpu_s', 0):.1f} s / {ws.get('client_cpu_s', 0):.1f} s")
    row(f"5 {n} consoles down", "CPU s/GiB", cp.get("cpu_s_per_gib"), ws.get("cpu_s_per_gib"), "{:.2f}")
    spread = "; MB/s per console p10/p50/p90 ours {} theirs {}".format(
        *("/".join(f"{x:.1f}" for x in d.get("rate_p10_p50_p90", [])) or "n/a" for d in (cp, ws)))
    row(f"5 {n} consoles down", "fairness slowest/fastest", cp.get("fairness"), ws.get("fairness"), "{:.2f}",
        "all streams start at one instant" + spread)
    sec = r.get("open", {})
    ws = sec.get("websockify TLS", {})
    for k, v in sec.items():
        if not k.startswith("consoleproxy"):
            continue
        for mode in ("sequential", "parallel32"):
            w = ws.get(mode, {})
            x = v[mode]
            ms = 1000 * x["proxy_cpu_s"] / max(x["opened"], 1)
            wms = 1000 * w["proxy_cpu_s"] / max(w["opened"], 1) if w.get("opened") else 0.0
            note = (f"{x['opened']}/{x['asked']} ok; proxy CPU {ms:.1f} ms/console (websockify {wms:.1f}); "
                    f"client CPU {1000 * x['client_cpu_s'] / max(x['opened'], 1):.1f} ms/console")
            if w.get("failed"):
                note += f"; websockify failed {w['failed']}"
            row("6 new TLS consoles", f"per s {mode} ({k})", v[mode]["per_s"], w.get("per_s"), "{:.0f}", note)
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("down MB/s", "down", "mb_s"), ("down CPU s/GiB", "down", "cpu_s_per_gib"),
        ("up MB/s", "up", "mb_s"), ("up CPU s/GiB", "up", "cpu_s_per_gib"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(18, 4))
    for ax, (title, key, metric) in zip(axes, panels, strict=False):
        sec = r.get(key, {})
        labels = [k for k in sec if sec[k].get(metric) is not None]
        ax.bar(range(len(labels)), [sec[k][metric] for k in labels],
               color=["tab:blue" if k.startswith("consoleproxy") else "tab:gray" if k.startswith("raw")
                      else "tab:orange" for k in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title)
    ax = axes[-1]
    sec = r.get("rtt", {})
    labels = [k for k in sec if "p50_us" in sec[k]]
    ax.bar(range(len(labels)), [sec[k]["p50_us"] for k in labels], color="tab:green")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_title("RTT p50 µs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(r: dict[str, Any], out_dir: Path, readme: Path | None) -> str:
    tab = table(r)
    g = goals(r)
    glines = ["| goal | measured | holds |", "|---|---|---|"]
    glines += [f"| {a} | {b} | {'yes' if c else 'no' if c is False else 'n/a'} |" for a, b, c in g]
    text = f"{tab}\n\n{chr(10).join(glines)}\n"
    (out_dir / "relay_table.md").write_text(text)
    chart(r, out_dir / "relay.png")
    if readme is not None and readme.is_file():
        body = readme.read_text()
        start, end = "<!-- relay-table -->", "<!-- /relay-table -->"
        if start in body and end in body:
            head, rest = body.split(start, 1)
            _, tail = rest.split(end, 1)
            readme.write_text(f"{head}{start}\n{text}{end}{tail}")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the code, not the speed")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    ap.add_argument("--one-loop", action="store_true", help="skip the consoleproxy-on-asyncio runs")
    ap.add_argument("--report-only", action="store_true", help="rebuild table and chart from relay.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    readme = None if args.quick else HERE / "README.md"
    if args.report_only:
        r = json.loads((out / "relay.json").read_text())
    else:
        if shutil.which("websockify", path=str(BIN)) is None:
            print("websockify is not installed: pip install -e '.[bench]'", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        r = run_all(QUICK if args.quick else Sizes(), out, other_loop=not args.one_loop)
        r["seconds"] = time.monotonic() - t0
        save(out, "", r)
        (out / "relay_.json").rename(out / "relay.json")
    print(report(r, out, readme))
    print(f"total {r.get('seconds', 0):.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
