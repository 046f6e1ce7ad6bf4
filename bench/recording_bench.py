"""Recording's cost (issue 19): one console streaming down, and idle consoles, recording off and on.

Reuses the relay benchmark's parts (relay_bench.py: the busy-VNC backend, the lean client, a fresh
proxy process per configuration, CPU and PSS from /proc). The same proxy configuration twice,
once with ``[recording] enabled = true`` (file store in the run's temporary directory, keys
redacted), once without. Goals: proxy CPU per GiB down with recording <= 1.15x without, for a
console the disk keeps up with (paced; every byte recorded); PSS per idle recorded console
<= 16 KiB (plain). The same console as fast as it goes is measured too: on a disk slower than
the stream its recording stops ("incomplete") and the console goes on, so its ratio says little.

``--quick`` checks the code with tiny sizes. Writes bench/results/recording.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import relay_bench as rb  # noqa: E402

MIB = rb.MIB


def _other_threads_cpu(pid: int) -> float:
    """CPU seconds of the proxy's threads other than its main one (the recordings' writer)."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == pid:
            continue
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a thread that ended
        total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _recorded(rec_dir: Path) -> dict[str, Any]:
    files = list(rec_dir.glob("*.cprec"))
    states = [json.loads(m.read_text()).get("state") for m in rec_dir.glob("*.json")]
    out = {"files": len(files), "bytes": sum(f.stat().st_size for f in files),
           "incomplete": states.count("incomplete")}
    shutil.rmtree(rec_dir, ignore_errors=True)
    return out


def run(
    down: int, reps: int, idle_n: int, store_root: Path | None = None, *, rate: float = 200 * MIB,
    rounds: int = 2,
) -> dict[str, Any]:
    """Recording off and on, alternately ``rounds`` times (this shared machine drifts): a console
    streaming ``down`` bytes paced at ``rate`` (the goal: every byte recorded), the same as fast
    as it goes (informational: a disk slower than the stream), and idle consoles."""
    rb.parts.raise_nofile()
    sizes = rb.Sizes(down=down, reps=reps)
    out: dict[str, Any] = {"down_bytes": down, "reps": reps, "idle_consoles": idle_n, "rate": rate,
                           "rounds": rounds}
    runs: dict[str, list[dict[str, Any]]] = {}
    plain_config = rb.consoleproxy_config
    with tempfile.TemporaryDirectory(prefix="recording-bench-") as tmp:
        env = rb.make_env(Path(tmp), HERE / "results" / "logs")
        with rb.backend(env):
            for rnd in range(rounds):
                for label, record in (("off", False), ("on", True)):
                    for scenario, pace in (("paced", rate), ("full", 0.0), ("idle", 0.0)):
                        if scenario == "idle" and rnd:
                            continue  # memory does not drift: once is enough
                        rec_dir = (store_root or Path(tmp)) / f"rec-{os.getpid()}-{label}-{scenario}"

                        def config(env: rb.Env, port: int, tls: bool, record: bool = record,
                                   rec_dir: Path = rec_dir) -> Path:
                            path = plain_config(env, port, tls)
                            if record:
                                with open(path, "a") as f:
                                    f.write(f'\n[recording]\nenabled = true\nstore = "file://{rec_dir}"\n')
                            return path

                        rb.consoleproxy_config = config
                        try:
                            with rb.proxy(env, "consoleproxy", False) as p:
                                print(f"  round {rnd + 1}: {scenario}, recording {label}", flush=True)
                                if scenario == "idle":
                                    res = rb.idle(env, p, idle_n)
                                else:
                                    before = _other_threads_cpu(p.pid)
                                    res = rb.stream(env, p, "down", sizes, rate=pace)
                                    streamed = down * reps / rb.GIB
                                    res["other_threads_cpu_s_per_gib"] = (
                                        _other_threads_cpu(p.pid) - before) / streamed
                        finally:
                            rb.consoleproxy_config = plain_config
                        if record:
                            res["recorded"] = _recorded(rec_dir)
                        runs.setdefault(f"{scenario}_{label}", []).append(res)
    out["runs"] = runs
    for scenario in ("paced", "full"):
        for label in ("off", "on"):
            every = [r for res in runs[f"{scenario}_{label}"] for r in res["runs"]]
            out[f"{scenario}_{label}"] = {
                "cpu_s_per_gib": rb.med([r["cpu_s_per_gib"] for r in every]),
                "mb_s": rb.med([r["mb_s"] for r in every]),
                "cpu_s_per_gib_runs": [round(r["cpu_s_per_gib"], 3) for r in every],
                "writer_cpu_s_per_gib": rb.med(
                    [res["other_threads_cpu_s_per_gib"] for res in runs[f"{scenario}_{label}"]]),
            }
        rec = [res["recorded"] for res in runs[f"{scenario}_on"]]
        out[f"{scenario}_recorded"] = {k: sum(r[k] for r in rec) for k in ("files", "bytes", "incomplete")}
        off, on = out[f"{scenario}_off"]["cpu_s_per_gib"], out[f"{scenario}_on"]["cpu_s_per_gib"]
        out[f"{scenario}_cpu_ratio"] = on / off if off else None
    out["cpu_ratio"] = out["paced_cpu_ratio"]
    out["pss_per_recorded_console_kib"] = runs["idle_on"][0]["pss_per_console_kib"]
    out["pss_per_plain_console_kib"] = runs["idle_off"][0]["pss_per_console_kib"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the code, not the speed")
    ap.add_argument("--down-mib", type=int, default=512, help="MiB streamed down per run (512)")
    ap.add_argument("--rate-mib", type=float, default=200,
                    help="MiB/s of the paced console, one the disk keeps up with (200)")
    ap.add_argument("--reps", type=int, default=3, help="runs per configuration and round (3)")
    ap.add_argument("--rounds", type=int, default=2, help="off/on rounds, alternating (2)")
    ap.add_argument("--idle", type=int, default=1000, help="idle consoles (1000)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for recording.json")
    ap.add_argument("--store-root", help="directory for the recordings (default: the run's temporary "
                    "directory; /dev/shm measures the proxy's CPU without the disk)")
    args = ap.parse_args(argv)
    if args.quick:
        args.down_mib, args.reps, args.rounds, args.idle = 4, 1, 1, 20
    t0 = time.monotonic()
    r = run(args.down_mib * MIB, args.reps, args.idle, Path(args.store_root) if args.store_root else None,
            rate=args.rate_mib * MIB, rounds=args.rounds)
    r["store_root"] = args.store_root or tempfile.gettempdir()
    r["seconds"] = time.monotonic() - t0
    r["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    (results / "recording.json").write_text(json.dumps(r, indent=1))
    streamed = args.rounds * args.reps * args.down_mib
    for scenario, what in (("paced", f"paced at {args.rate_mib:g} MiB/s (goal <= 1.15)"),
                           ("full", "as fast as it goes (informational)")):
        off, on, rec = r[f"{scenario}_off"], r[f"{scenario}_on"], r[f"{scenario}_recorded"]
        print(f"CPU s/GiB down, {what}: off {off['cpu_s_per_gib']:.3f} {off['cpu_s_per_gib_runs']}, "
              f"on {on['cpu_s_per_gib']:.3f} {on['cpu_s_per_gib_runs']} (x{r[f'{scenario}_cpu_ratio']:.2f}); "
              f"of which the writer thread {on['writer_cpu_s_per_gib']:.3f}; "
              f"MB/s off {off['mb_s']:.0f}, on {on['mb_s']:.0f}; recorded {rec['bytes'] / MIB:.0f} of "
              f"{streamed} MiB, {rec['incomplete']} of {rec['files']} incomplete")
    print(f"PSS per idle console: plain {r['pss_per_plain_console_kib']:.1f} KiB, "
          f"recorded {r['pss_per_recorded_console_kib']:.1f} KiB (goal <= 16); total {r['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
