"""`make bench`: every benchmark we have, each writing bench/results/<name>.json.

The DNS responder's queries per second (bench/dns_bench.py), the relay against websockify
0.13.0 and raw TCP (bench/relay_bench.py; about 4 minutes on a 2-core machine), memory under
churn (bench/churn.py; about a minute), the resume storm after a lost instance
(bench/resume_storm.py; under a minute) and recording's cost (bench/recording_bench.py; under a
minute). See bench/README.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    benches = [
        ["dns_bench.py"], ["relay_bench.py"], ["churn.py"], ["resume_storm.py"], ["recording_bench.py"],
    ]
    for args in benches:
        print(f"== {args[0]}", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], check=False).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
