"""Small runs of the benchmarks (bench/relay_bench.py, bench/churn.py and bench/recording_bench.py
with --quick, bench/resume_storm.py with 20 consoles) so their code cannot rot.

Tiny sizes, every scenario, both proxies and raw TCP; checks that it completes and writes the
JSON, the table and the chart with every section filled. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

pytestmark = pytest.mark.integration  # the benchmark scripts, websockify

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script: str, out: Path) -> subprocess.CompletedProcess[str]:
    """``bench/SCRIPT --quick --out OUT``; fails the test with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_relay_bench_quick_run_writes_results(tmp_path: Path) -> None:
    require_tool(str(Path(sys.executable).parent / "websockify"), "websockify==0.13.0 (pip, extra test)")
    out = tmp_path / "results"
    run_quick("relay_bench.py", out)
    r = json.loads((out / "relay.json").read_text())
    for label in ("raw TCP", "consoleproxy", "websockify", "consoleproxy TLS", "websockify TLS"):
        assert r["down"][label]["mb_s"] > 0, label
    for label in ("raw TCP", "consoleproxy", "websockify"):  # round trips: plain only
        assert r["rtt"][label]["p50_us"] > 0, label
    for label in ("consoleproxy", "websockify", "consoleproxy TLS", "websockify TLS"):
        assert r["up"][label]["cpu_s_per_gib"] is not None, label
    idle = r["idle"]
    assert any(k.startswith("consoleproxy") and v["opened"] == v["asked"] for k, v in idle.items())
    assert all(v["pss_after_kib"] > 0 for v in idle.values())
    assert r["multi"]["consoleproxy"]["fairness"] > 0
    assert r["open"]["consoleproxy TLS"]["parallel32"]["failed"] == 0
    table = (out / "relay_table.md").read_text()
    assert "websockify" in table and "| goal |" in table
    assert (out / "relay.png").stat().st_size > 1000


def test_idle_memory_script_reports_per_console_sites() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "idle_memory.py"), "-n", "20", "--no-gc", "--top", "5"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first, *sites = proc.stdout.splitlines()
    assert first.startswith("20 consoles open (0 failed); heap growth "), first
    assert len(sites) == 5 and all(" B " in s and ".py:" in s for s in sites), sites


def test_churn_bench_quick_run_reports_waves_and_the_collection_pause(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = run_quick("churn.py", out)
    r = json.loads((out / "churn.json").read_text())
    for key in ("tls", "plain"):
        rows = r[key]["rows"]
        assert [row["wave"] for row in rows] == [0, 1, 2], rows
        assert all(row["rss_kib"] > 0 and row["tracked"] > 0 for row in rows)
        assert isinstance(r[key]["rss_growth_kib_per_ended_console"], float)
    assert r["gc_pause"]["consoles"] == 10 and r["gc_pause"]["seconds"] > 0
    assert "| TLS | 2 x 5 |" in proc.stdout and "One full collection with 10 idle" in proc.stdout


def test_recording_bench_quick_run_records_the_paced_and_the_unpaced_console(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run_quick("recording_bench.py", out)
    r = json.loads((out / "recording.json").read_text())
    for scenario in ("paced", "full"):
        assert r[f"{scenario}_off"]["cpu_s_per_gib"] > 0 and r[f"{scenario}_on"]["cpu_s_per_gib"] > 0
        rec = r[f"{scenario}_recorded"]
        assert rec["files"] == 1 and rec["bytes"] > r["down_bytes"], rec  # the stream and its framing
    assert r["paced_recorded"]["incomplete"] == 0  # 4 MiB paced: well inside the backlog
    assert r["pss_per_recorded_console_kib"] is not None and r["cpu_ratio"] is not None


def test_resume_storm_small_run_writes_results(tmp_path: Path) -> None:
    """bench/resume_storm.py with 20 consoles (SQLite store): every one comes back on the survivor."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "resume_storm.py"), "--consoles", "20", "--store", "sqlite",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((out / "resume_storm.json").read_text())
    assert r["back"] == 20 and r["lost"] == 0, r
    assert r["seconds_to_99pct"] is not None and r["survivor_cpu_seconds"] > 0, r
