"""Churn (scenario 7): consoles opened, relaying and closed in waves against one ``consoleproxy serve``.

An ended console must be freed by reference counting at once (issue 24). Left in a reference cycle,
it waits for a full collection of the cycle collector, which in a process holding thousands of idle
consoles comes rarely: RSS then climbs with every console that has ended. This reports

- RSS after each wave of ``--wave`` TLS consoles (opened, one command relayed, closed) and the
  growth per ended console from the end of the first wave to the end of the last (goal <= 8 KiB;
  the first wave sets the allocator's high-water mark and the caches, so it is the baseline);
- how many objects the cycle collector tracks after each wave (flat when nothing is retained);
- how long one full collection takes with ``--idle`` idle consoles open (the pause every console
  would wait through, and what a console left in a cycle costs to free).

The proxy runs under bench/gc_probe.py (``serve`` unchanged, plus a thread that counts and
collects on request). Writes bench/results/churn.json and prints a table.

    .venv/bin/python bench/churn.py [--waves 5] [--wave 300] [--idle 10000] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import relay_bench as rb  # noqa: E402
import relay_parts as parts  # noqa: E402

KIB = 1024
# The churn proxy pings every 5 s, so its sweeper passes every 0.5 s (lifecycle.sweep: a tenth).
PING_SECONDS = 5
SWEEP_SECONDS = PING_SECONDS / 10
GOAL_KIB_PER_ENDED = 8.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_nofile(want: int) -> int:
    """Root may raise the hard open-files limit too (one process holds two sockets a console)."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    return parts.raise_nofile()


class ProbedProxy:
    """``consoleproxy serve`` under gc_probe.py, its admin listener on a known port."""

    def __init__(self, env: rb.Env, tls: bool, logs: TextIO) -> None:
        self.port = rb.free_port()
        self.admin_port = rb.free_port()
        cfg = rb.consoleproxy_config(env, self.port, tls)
        text = cfg.read_text()
        assert "[admin]\naddress = \"127.0.0.1\"\nport = 0\n" in text, "relay_bench's config changed"
        text = text.replace("[admin]\naddress = \"127.0.0.1\"\nport = 0\n",
                            f"[admin]\naddress = \"127.0.0.1\"\nport = {self.admin_port}\n")
        cfg.write_text(text.replace("[limits]\n", f"[limits]\nping_interval_seconds = {PING_SECONDS}\n"))
        self.key_file = env.work / "admin.key"
        self.tls = tls
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [rb.PY, str(HERE / "gc_probe.py"), "serve", "--config", str(cfg)],
            stdin=subprocess.PIPE, stdout=logs, stderr=subprocess.STDOUT, text=True,
            pass_fds=(w,), env=os.environ | {"GC_PROBE_FD": str(w)}, start_new_session=True,
        )
        os.close(w)
        self.answers = os.fdopen(r)
        rb.wait_port(self.port, self.proc)
        rb.wait_port(self.admin_port, self.proc)

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.answers.readline()  # the probe answers every command with one line
        if not line:
            raise RuntimeError(f"the proxy exited ({self.proc.poll()}) before answering {cmd!r}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def sessions(self) -> int:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/metrics",
            headers={"Authorization": f"Bearer {self.key_file.read_text().strip()}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback admin URL
            text = r.read().decode()
        m = re.search(r"^consoleproxy_sessions_active (\S+)$", text, re.M)
        assert m, "no consoleproxy_sessions_active in /metrics"
        return int(float(m.group(1)))

    def wait_no_sessions(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.sessions():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.sessions()} consoles still open {timeout} s after closing")
            time.sleep(0.1)

    def target(self, env: rb.Env) -> dict[str, Any]:
        return rb.Proxy("consoleproxy", self.tls, self.proc, self.port, "").target(env)

    def stop(self) -> None:
        rb.stop(self.proc)
        self.answers.close()


@contextlib.contextmanager
def probed_proxy(env: rb.Env, tls: bool) -> Iterator[ProbedProxy]:
    env.logs.mkdir(parents=True, exist_ok=True)
    with open(env.logs / f"churn-{'tls' if tls else 'plain'}.log", "w") as logs:
        p = ProbedProxy(env, tls, logs)
        try:
            yield p
        finally:
            p.stop()


@contextlib.contextmanager
def idle_consoles(env: rb.Env, p: ProbedProxy, n: int, first: int) -> Iterator[int]:
    """``n`` consoles opened (RFB handshake, one command relayed up), held, closed on leaving."""
    nproc = 2 if n >= 100 else 1
    per = [n // nproc + (1 if i < n % nproc else 0) for i in range(nproc)]
    starts = [first + sum(per[:i]) for i in range(nproc)]
    procs = [rb.client({"target": p.target(env), "op": "idle", "args": {"n": k, "parallel": 64, "first": f}})
             for k, f in zip(per, starts, strict=True)]
    try:
        opened = 0
        for c in procs:
            assert c.stdout is not None
            line = c.stdout.readline()
            if not line:
                raise RuntimeError("an idle client died")
            report = json.loads(line)
            if report["failed"]:
                raise RuntimeError(f"consoles failed to open: {report['errors']}")
            opened += report["opened"]
        yield opened
    finally:
        for c in procs:
            with contextlib.suppress(OSError):
                assert c.stdin is not None
                c.stdin.write("close\n")
                c.stdin.flush()
        for c in procs:
            c.communicate(timeout=300)


def waves(env: rb.Env, tls: bool, count: int, size: int) -> dict[str, Any]:
    rows = []
    with probed_proxy(env, tls) as p:
        rows.append({"wave": 0, "rss_kib": rss_kib(p.proc.pid), **p.ask("objects")})
        for w in range(1, count + 1):
            t0 = time.perf_counter()
            with idle_consoles(env, p, size, first=w * size) as opened:
                assert opened == size
            p.wait_no_sessions()
            # The proxy gives the last ends' pages back on its first sweeper pass without an end
            # (consoleproxy/memory.py): a pass is 0.5 s with this config's ping interval.
            time.sleep(3 * SWEEP_SECONDS)
            rows.append({"wave": w, "seconds": time.perf_counter() - t0, "rss_kib": rss_kib(p.proc.pid),
                         **p.ask("objects")})
            print(f"    wave {w}: RSS {rows[-1]['rss_kib'] / KIB:.1f} MiB, "
                  f"{rows[-1]['tracked']} objects tracked", flush=True)
        # What a full collection finds now is what the waves left in cycles.
        after = p.ask("collect")
    first, last = rows[1], rows[-1]
    ended = size * (count - 1)
    per = (last["rss_kib"] - first["rss_kib"]) / ended if ended else 0.0
    def growth(key: str, scale: float = 1.0) -> float | None:
        if not ended or first.get(key) is None or last.get(key) is None:
            return None
        return float(last[key] - first[key]) / scale / ended

    return {
        "tls": tls, "waves": count, "wave_size": size, "rows": rows,
        "rss_growth_kib_per_ended_console": per,
        "malloc_growth_kib_per_ended_console": growth("malloc_in_use", KIB),
        "py_blocks_growth_per_ended_console": growth("py_blocks"),
        "tracked_growth_per_ended_console": growth("tracked") or 0.0,
        "unreachable_after_last_wave": after["unreachable"],
        "holds": per <= GOAL_KIB_PER_ENDED,
    }


def gc_pause(env: rb.Env, n: int) -> dict[str, Any]:
    with probed_proxy(env, False) as p, idle_consoles(env, p, n, first=0) as opened:
        time.sleep(1.0)  # the last handshakes settle into the relay
        runs = [p.ask("collect") for _ in range(3)]
        trims = [p.ask("trim") for _ in range(3)]
    return {"consoles": opened, "runs": runs, "seconds": min(r["seconds"] for r in runs),
            "tracked": runs[-1]["tracked"], "trim_seconds": max(t["seconds"] for t in trims)}


def _kib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} KiB"


def table(r: dict[str, Any]) -> str:
    lines = ["| churn | waves x consoles | RSS after wave 1 -> last | RSS per ended console | malloc in use "
             "per ended console | objects tracked per ended console | goal <= 8 KiB |",
             "|---|---|---|---|---|---|---|"]
    for key in ("tls", "plain"):
        w = r.get(key)
        if not w:
            continue
        rows = w["rows"]
        lines.append(
            f"| {'TLS' if w['tls'] else 'plain'} | {w['waves']} x {w['wave_size']} | "
            f"{rows[1]['rss_kib'] / KIB:.1f} -> {rows[-1]['rss_kib'] / KIB:.1f} MiB | "
            f"{w['rss_growth_kib_per_ended_console']:.2f} KiB | "
            f"{_kib(w['malloc_growth_kib_per_ended_console'])} | "
            f"{w['tracked_growth_per_ended_console']:.2f} | {'yes' if w['holds'] else 'no'} |"
        )
    g = r.get("gc_pause")
    if g:
        lines.append("")
        lines.append(f"One full collection with {g['consoles']} idle plain consoles open: "
                     f"{g['seconds'] * 1000:.0f} ms ({g['tracked']} objects tracked); one malloc_trim "
                     f"{g['trim_seconds'] * 1000:.2f} ms.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waves", type=int, default=5)
    ap.add_argument("--wave", type=int, default=300, help="consoles per wave")
    ap.add_argument("--idle", type=int, default=10000, help="idle consoles for the collection's pause")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the code, not the memory")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.waves, args.wave, args.idle = 2, 5, 10
    limit = raise_nofile(65536)
    idle = min(args.idle, (limit - 200) // 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    r: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="churn-bench-") as tmp:
        env = rb.make_env(Path(tmp), out / "logs")
        with rb.backend(env):
            for tls in (True, False):
                print(f"  churn: {'TLS' if tls else 'plain'}, {args.waves} waves of {args.wave}", flush=True)
                r["tls" if tls else "plain"] = waves(env, tls, args.waves, args.wave)
            print(f"  churn: full collection with {idle} idle consoles", flush=True)
            r["gc_pause"] = gc_pause(env, idle)
    (out / "churn.json").write_text(json.dumps(r, indent=2) + "\n")
    print(table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
