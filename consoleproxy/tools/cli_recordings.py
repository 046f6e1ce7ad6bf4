"""Command line: console recordings in the local ``[recording] store`` (``recordings
list|export|play-url``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from consoleproxy.tools.cli_args import UsageError

__all__ = ["cmd_recordings_export", "cmd_recordings_list", "cmd_recordings_play_url", "recording_store"]


def recording_store(args: argparse.Namespace) -> tuple[Any, Any]:
    """The configuration and the local recording store it names (``[recording] store``)."""
    from consoleproxy.config import load_config
    from consoleproxy.recordings.recording_store import FileStore, parse_store

    cfg = load_config(args.config) if args.config else load_config()
    url = parse_store(cfg.recording.store)
    if url.scheme != "file":
        raise UsageError(f"[recording] store {cfg.recording.store!r} is not a local directory")
    return cfg, FileStore(Path(url.path))


def cmd_recordings_list(args: argparse.Namespace) -> int:
    from consoleproxy.recordings.recording_store import matches

    _, store = recording_store(args)
    filters = {k: v for k in ("vm", "user", "client_ip", "since", "until") if (v := getattr(args, k, None))}
    items = [m for m in (store.entries() if store.dir.is_dir() else []) if matches(m, filters)]
    if args.json:
        print(json.dumps(items, indent=1))
        return 0
    for m in items:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(m.get("started", 0))))
        print(f"{m['id']}  {started}Z  vm={m.get('vm') or '-'}  client={m.get('client_ip') or '-'}  "
              f"{m.get('state')}  {m.get('size', 0)} bytes")
    return 0


def cmd_recordings_export(args: argparse.Namespace) -> int:
    import shutil

    from consoleproxy.recordings.recording_store import check_file

    _, store = recording_store(args)
    path = store.path(args.id)
    if not path.exists():
        raise UsageError(f"no recording {args.id} in {store.dir}")
    if path.name.endswith(".part"):
        raise UsageError(f"recording {args.id} is still being recorded")
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} exists; not overwritten")
    check_file(path)  # a damaged recording: RecordingCorrupt names where
    shutil.copyfile(path, out)
    print(f"{args.id} -> {out} ({out.stat().st_size} bytes)")
    return 0


def cmd_recordings_play_url(args: argparse.Namespace) -> int:
    from consoleproxy.recordings.recording_store import check_id

    cfg, _ = recording_store(args)
    check_id(args.id)
    host = cfg.admin.address
    if ":" in host:
        host = f"[{host}]"
    # The page asks for the admin key itself; it never goes into the URL.
    print(f"http://{host}:{cfg.admin.port}/recordings/{args.id}")
    return 0
