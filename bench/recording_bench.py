"""Recording's cost (issue 19): one console streaming down, and idle consoles, recording off and on.

Reuses the relay benchmark's parts (relay_bench.py: the busy-VNC backend, the lean client, a fresh
proxy process per configuration, CPU and PSS from /proc). The same proxy configuration twice,
once with ``[recording] enabled = true`` (file store in the run's temporary directory, keys
redacted), once without. Goals: proxy CPU per GiB down with recording <= 1.15x without; PSS per
idle recorded console <= 16 KiB (plain).

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


def run(down: int, reps: int, idle_n: int, store_root: Path | None = None) -> dict[str, Any]:
    rb.parts.raise_nofile()
    sizes = rb.Sizes(down=down, reps=reps)
    out: dict[str, Any] = {"down_bytes": down, "reps": reps, "idle_consoles": idle_n}
    plain_config = rb.consoleproxy_config
    with tempfile.TemporaryDirectory(prefix="recording-bench-") as tmp:
        env = rb.make_env(Path(tmp), HERE / "results" / "logs")
        with rb.backend(env):
            for label, record in (("off", False), ("on", True)):
                rec_dir = (store_root or Path(tmp)) / f"recording-bench-{os.getpid()}-{label}"

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
                        print(f"  down, recording {label}", flush=True)
                        out[f"down_{label}"] = rb.stream(env, p, "down", sizes)
                    with rb.proxy(env, "consoleproxy", False) as p:
                        print(f"  {idle_n} idle, recording {label}", flush=True)
                        out[f"idle_{label}"] = rb.idle(env, p, idle_n)
                finally:
                    rb.consoleproxy_config = plain_config
                if record:
                    files = list(rec_dir.glob("*.cprec"))
                    out["recorded_files"] = len(files)
                    out["recorded_bytes"] = sum(f.stat().st_size for f in files)
                    states = [json.loads(m.read_text()).get("state") for m in rec_dir.glob("*.json")]
                    out["recordings_incomplete"] = states.count("incomplete")
                    shutil.rmtree(rec_dir, ignore_errors=True)
    off, on = out["down_off"]["cpu_s_per_gib"], out["down_on"]["cpu_s_per_gib"]
    out["cpu_ratio"] = on / off if off else None
    out["pss_per_recorded_console_kib"] = out["idle_on"]["pss_per_console_kib"]
    out["pss_per_plain_console_kib"] = out["idle_off"]["pss_per_console_kib"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the code, not the speed")
    ap.add_argument("--down-mib", type=int, default=512, help="MiB streamed down per run (512)")
    ap.add_argument("--reps", type=int, default=3, help="runs per configuration, median (3)")
    ap.add_argument("--idle", type=int, default=1000, help="idle consoles (1000)")
    ap.add_argument("--store-root", help="directory for the recordings (default: the run's temporary "
                    "directory; /dev/shm measures the proxy's CPU without the disk)")
    args = ap.parse_args(argv)
    if args.quick:
        args.down_mib, args.reps, args.idle = 4, 1, 20
    t0 = time.monotonic()
    r = run(args.down_mib * MIB, args.reps, args.idle, Path(args.store_root) if args.store_root else None)
    r["store_root"] = args.store_root or tempfile.gettempdir()
    r["seconds"] = time.monotonic() - t0
    r["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "recording.json").write_text(json.dumps(r, indent=1))
    print(f"CPU s/GiB down: recording off {r['down_off']['cpu_s_per_gib']:.3f}, "
          f"on {r['down_on']['cpu_s_per_gib']:.3f} (x{r['cpu_ratio']:.2f}; goal <= 1.15)")
    print(f"MB/s down: off {r['down_off']['mb_s']:.0f}, on {r['down_on']['mb_s']:.0f}")
    print(f"PSS per idle console: plain {r['pss_per_plain_console_kib']:.1f} KiB, "
          f"recorded {r['pss_per_recorded_console_kib']:.1f} KiB (goal <= 16)")
    print(f"recorded {r.get('recorded_files')} files, {r.get('recorded_bytes', 0) / MIB:.0f} MiB "
          f"(streamed {args.reps} x {args.down_mib} MiB), {r.get('recordings_incomplete')} incomplete; "
          f"total {r['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
