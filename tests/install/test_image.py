"""The production image's steps, run for real without a container engine (issue 18).

No container engine runs here and base images cannot be pulled, so this test executes the
Dockerfile's own instructions (WORKDIR, COPY, ENV, RUN, USER, CMD, HEALTHCHECK) with each stage's
``/`` mapped to a directory of its own: the node stage packs noVNC with npm, the wheel stage builds
the wheel with ``pip wheel`` in a fresh virtualenv, the runtime stage installs it into another
fresh virtualenv whose PATH has no node, npm or compiler, and runs CMD as the image's unprivileged
user from its WORKDIR with the image's configuration (docker/consoleproxy.toml). Then /healthz,
/readyz, the console page, noVNC and a console to a VNC server must work, and the HEALTHCHECK
command must exit 0.

What differs from a container, all of it here: paths under ``/`` that the Dockerfile names are
rewritten into the stage's directory (in RUN lines, ENV values, CMD and the copied configuration);
the ports come from ``CONSOLEPROXY_LISTEN_PORTS`` / ``CONSOLEPROXY_ADMIN_PORT`` (free ports: tests
never bind fixed ones), the allowed targets from ``CONSOLEPROXY_TARGETS_*`` (the VNC server is on
loopback), and the keyring file an operator mounts is written by the test. Two RUN lines are not run,
each named in SKIPPED: apt-get (ping and traceroute, for `diagnose` only) and the system account
(the test runs the service as the USER's uid and gid directly). Every other line runs, so a step
added to the Dockerfile is tested without editing this file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import require_tool
from dist_helpers import bare_env, fresh_source, run, system_python
from harness import RFBClient, connect_echo, echo_backend, free_port, tcp_server
from test_dockerfile import DOCKERFILE, Stage, parse

from consoleproxy.policy.tokens import Keyring, issue

pytestmark = pytest.mark.integration  # npm, PyPI, setpriv

# RUN lines this test does not execute, and why (a substring of the line → the reason).
SKIPPED = {
    "apt-get install": "Debian packages for `diagnose --ping/--traceroute` (system-wide, root)",
    "useradd": "the system account; the service runs as the USER's uid:gid directly",
}
# Programs the python:slim stages may use from outside their virtualenv (the image's base system).
BASE_TOOLS = ("sh", "bash", "mkdir", "rm", "chown", "cp", "ls", "cat", "env")


class Image:
    """The Dockerfile's stages executed on this machine, each with ``/`` mapped to ``root/<stage>``."""

    def __init__(self, work: Path, context: Path, stages: list[Stage]) -> None:
        self.work, self.context, self.stages = work, context, stages
        self.roots: dict[str, Path] = {}
        self.prefixes = self._prefixes()
        tools = work / "base-tools"
        tools.mkdir()
        for name in BASE_TOOLS:
            found = shutil.which(name)
            assert found, name
            (tools / name).symlink_to(found)
        self.base_tools = tools

    def _prefixes(self) -> list[str]:
        """Absolute paths the Dockerfile names (WORKDIRs, COPY ends, a copied file's directory),
        longest first."""
        found: set[str] = set()
        for s in self.stages:
            found |= set(s.all("WORKDIR"))
            for c in s.all("COPY"):
                words = c.split()
                for w in words[1:] if words[0].startswith("--from=") else words[-1:]:
                    if w.startswith("/"):
                        found.add(w if "." not in Path(w).name else str(Path(w).parent))
        return sorted(found, key=len, reverse=True)

    def rewrite(self, text: str, root: Path) -> str:
        """``text`` with the image's absolute paths moved under ``root``."""
        for p in self.prefixes:
            text = re.sub(rf"(?<![\w./-]){re.escape(p)}(?=[/\s\"']|$)", str(root) + p, text)
        return text

    def build(self, uid: int, gid: int) -> dict[str, str]:
        """Run every stage; returns the runtime stage's environment (ENV, PATH) for CMD."""
        env: dict[str, str] = {}
        for index, stage in enumerate(self.stages):
            name = stage.name or str(index)
            root = self.roots[name] = self.work / "stage" / name
            root.mkdir(parents=True)
            cwd = root
            env = self._stage_env(stage, root)
            for op, args in stage.instructions:
                if op == "WORKDIR":
                    cwd = Path(str(root) + args)
                    cwd.mkdir(parents=True, exist_ok=True)
                elif op == "COPY":
                    self._copy(args, root, cwd)
                elif op == "ENV":
                    key, _, value = args.partition("=")
                    env[key] = self.rewrite(value, root)
                elif op == "RUN":
                    if any(k in args for k in SKIPPED):
                        continue
                    if os.geteuid() != 0:  # chown to the image's ids needs root; to ours it does not
                        args = args.replace(f"{uid}:{gid}", f"{os.getuid()}:{os.getgid()}")
                    run(["bash", "-ec", self.rewrite(args, root)], cwd=cwd, env=env)
            self.cwd = cwd
        return env

    def _stage_env(self, stage: Stage, root: Path) -> dict[str, str]:
        if stage.image.startswith("node:"):
            require_tool("npm", "npm")
            return bare_env(os.environ["PATH"])
        # A python:slim stage: its own interpreter (a fresh virtualenv), the base tools, nothing else.
        venv = root / "usr-local"
        run([image_python(), "-m", "venv", str(venv)], cwd=self.work)
        path = f"{venv / 'bin'}:{self.base_tools}"
        for absent in ("node", "npm", "cc", "gcc"):
            assert shutil.which(absent, path=path) is None, absent
        return bare_env(path, HOME=str(root / "root"))

    def _copy(self, args: str, root: Path, cwd: Path) -> None:
        words = args.split()
        src_root = self.context
        if words[0].startswith("--from="):
            src_root = self.roots[words[0].removeprefix("--from=")]
            words = words[1:]
        *sources, dest = words
        target = Path(str(root) + dest) if dest.startswith("/") else cwd / dest
        for src in sources:
            origin = src_root / src.lstrip("/")
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True)
            else:
                into = target / origin.name if dest.endswith("/") or len(sources) > 1 else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)
                if into.suffix == ".toml":  # the image's configuration: its paths live under root
                    into.write_text(self.rewrite(into.read_text(), root))


def image_python() -> str:
    """A system-wide Python 3.11 as in python:3.11-slim: installed where every user may run it (a
    Python under root's home, like pyenv's, cannot be the service user's interpreter)."""
    found = shutil.which("python3.11", path="/usr/local/bin:/usr/bin")
    return found or str(system_python())


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the service user can traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="consoleproxy-image-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(uid: int, gid: int) -> list[str]:
    """The prefix that runs a command as the image's USER (root: setpriv; otherwise we already are)."""
    if os.geteuid() != 0:
        return []
    return [require_tool("setpriv", "util-linux"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


async def test_image_steps_serve_consoles_as_an_unprivileged_user(workdir: Path) -> None:
    stages = parse(DOCKERFILE.read_text(encoding="utf-8"))
    runtime = stages[-1]
    uid, _, gid = runtime.all("USER")[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0, "USER as numeric uid:gid, not root"
    ran = [r for s in stages for r in s.all("RUN") if any(k in r for k in SKIPPED)]
    assert len(ran) == len(SKIPPED), f"each SKIPPED entry matches one RUN line: {ran}"

    image = Image(workdir, fresh_source(workdir / "context"), stages)
    env = await asyncio.to_thread(image.build, int(uid), int(gid))
    root = image.roots[runtime.name or str(len(stages) - 1)]
    config = Path(env["CONSOLEPROXY_CONFIG"])
    assert config.is_file() and str(config).startswith(str(root))

    # What an operator mounts: the token keyring, readable by the service user.
    keyring = Keyring.generate()
    keys = Path(str(root) + "/etc/consoleproxy/keys.json")
    keyring.save(keys)
    if os.geteuid() == 0:
        os.chown(keys, int(uid), int(gid))

    # Below the kernel's ephemeral range (32768 and up), where outgoing connections take ports.
    port, admin = free_port(21000, 26000), free_port(26001, 32000)
    env |= {
        "CONSOLEPROXY_LISTEN_PORTS": f"[{port}]", "CONSOLEPROXY_ADMIN_PORT": str(admin),
        "CONSOLEPROXY_TARGETS_ALLOWED_CIDRS": '["127.0.0.1/32"]', "CONSOLEPROXY_TARGETS_PORTS": "1-65535",
    }
    cmd = [image.rewrite(a, root) for a in json.loads(runtime.all("CMD")[-1])]
    healthcheck = json.loads(runtime.all("HEALTHCHECK")[-1].split("CMD", 1)[1])
    user = as_user(int(uid), int(gid))
    assert image.cwd != image.context and not (image.cwd / "novnc_static").exists()

    proc = await asyncio.create_subprocess_exec(
        *user, *cmd, cwd=image.cwd, env=env, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(60):
            while "serving on" not in (line := (await proc.stderr.readline()).decode()):
                assert line, f"serve exited: {log}"
                log.append(line)
        found = (re.search(r"trust this CA in the browser: (\S+)", line) for line in log)
        ca = next(m.group(1) for m in found if m)
        ctx = ssl.create_default_context(cafile=ca)
        base = f"https://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for path, want in (("/healthz", None), ("/readyz", None), ("/novnc/core/rfb.js", "export")):
                async with http.get(base + path, ssl=ctx) as r:
                    assert r.status == 200, (path, r.status, await r.text())
                    assert want is None or want in await r.text()
            async with tcp_server(echo_backend) as vnc:
                token = issue(keyring, host="127.0.0.1", port=vnc, vm="image")
                async with http.get(f"{base}/console?token={token}", ssl=ctx) as r:
                    assert r.status == 200 and "console.js" in await r.text()
                async with RFBClient.connect(f"wss://127.0.0.1:{port}/websockify?token={token}",
                                             ssl=ctx) as c:
                    await connect_echo(c)
                    await c.send(b"through the image")
                    assert await c.read_exact(17) == b"through the image"
        # The HEALTHCHECK command itself, as the container would run it (same user, env, cwd).
        probe = await asyncio.to_thread(
            subprocess.run, [*user, *healthcheck], cwd=image.cwd, env=env, capture_output=True,
            text=True, timeout=30, check=False,
        )
        assert probe.returncode == 0, probe.stderr
        # The process runs as the image's user, not as root.
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s", status, re.M) or os.geteuid() != 0, status
    finally:
        proc.send_signal(signal.SIGTERM)  # STOPSIGNAL: drains, then exits
        async with asyncio.timeout(30):
            rc = await proc.wait()
    assert rc == 0
    # Stopped, the HEALTHCHECK fails: it probes the service, not merely Python.
    down = await asyncio.to_thread(
        subprocess.run, [*user, *healthcheck], cwd=image.cwd, env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )
    assert down.returncode == 1 and "healthz" in down.stderr
