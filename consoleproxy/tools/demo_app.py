"""``consoleproxy demo``: the proxy, the embedded demo VNC server and a development keyring.

Everything lives in one state directory (keyring, admin key) so a second run reuses it. The demo
VNC server listens on loopback with a random password that only the token carries.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from consoleproxy.config import Config, load_config, replace
from consoleproxy.policy.tokens import Keyring, issue
from consoleproxy.server import ProxyServer
from consoleproxy.tools.demo import DemoVncServer

__all__ = ["demo_config", "run_demo", "start_demo"]


def demo_config(state_dir: Path, *, host: str, port: int, vnc_port: int) -> Config:
    cfg = load_config(env={})
    cfg = replace(
        cfg,
        listen={"address": host, "ports": [port], "tls": True},
        tls={"store": str(state_dir / "certs")},
        admin={"address": "127.0.0.1", "port": 0, "key_file": str(state_dir / "admin.key")},
        tokens={"keyring": str(state_dir / "keys.json"), "ttl_seconds": 3600},
        targets={"allowed_cidrs": ["127.0.0.1/32"], "ports": f"{vnc_port}"},
    )
    return cfg


async def start_demo(
    state_dir: Path, *, host: str = "127.0.0.1", port: int = 8443
) -> tuple[ProxyServer, DemoVncServer, str]:
    """Start both servers; return them with a console URL whose token is valid for an hour."""
    state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up
    keys = state_dir / "keys.json"
    if not keys.exists():
        Keyring.generate().save(keys)
    keyring = Keyring.load(keys)
    vnc = DemoVncServer()
    await vnc.start()
    cfg = demo_config(state_dir, host=host, port=port, vnc_port=vnc.port)
    proxy = ProxyServer(cfg, keyring=keyring)
    await proxy.start()
    token = issue(
        keyring,
        host="127.0.0.1",
        port=vnc.port,
        vm="demo",
        name="consoleproxy demo",
        password=vnc.password,
        ttl=3600,
    )
    public_port = proxy.public_ports[0]
    # The development certificate names localhost and 127.0.0.1.
    shown = "localhost" if host in ("127.0.0.1", "localhost") else host
    url = f"https://{shown}:{public_port}/console?token={token}"
    return proxy, vnc, url


async def run_demo(state_dir: Path, port: int, host: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Handlers first: a Ctrl-C right after the URL appears must stop cleanly, not raise.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    proxy, vnc, url = await start_demo(state_dir, host=host, port=port)
    print("consoleproxy demo is running.", flush=True)
    print(f"Console URL (valid for one hour, single use): {url}", flush=True)
    if proxy.dev_ca is not None:
        print(f"Development CA (trust it in your browser): {proxy.dev_ca}", flush=True)
    print(f"Admin API: http://127.0.0.1:{proxy.admin_port}/ (key in {state_dir / 'admin.key'})")
    print("Press Ctrl-C to stop.", flush=True)
    await stop.wait()
    await proxy.close()
    await vnc.close()
    return 0

