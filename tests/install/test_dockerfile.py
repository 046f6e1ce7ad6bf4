"""The production Dockerfile, checked by parsing it (no Docker engine runs here; Debian has no hadolint).

The checks are the ones a reviewer (and hadolint's DL rules where they apply) would make: stages,
pinned base images, a non-root runtime user, a HEALTHCHECK on /healthz, exposed ports, noVNC
copied from the npm stage, apt and pip hygiene, and a CMD that runs ``consoleproxy serve --config``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consoleproxy.config import load_config
from consoleproxy.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = ROOT / "docker" / "consoleproxy.toml"


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


def parse(text: str) -> list[Stage]:
    """Instructions with continuation lines joined and comments dropped, grouped by FROM."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in lines:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
            continue
        assert stages, f"{op} before the first FROM"
        stages[-1].instructions.append((op, args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text(encoding="utf-8"))


def test_multi_stage_node_build_and_slim_python_runtime(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    node = [s for s in stages if s.image.startswith("node:")]
    assert len(node) == 1 and node[0].name, "one named node stage fetches noVNC"
    runs = " ".join(node[0].all("RUN"))
    assert "npm pack" in runs and "package-lock.json" in runs, "npm pack: the version package-lock.json pins"
    copied = " ".join(node[0].all("COPY"))
    assert "package.json" in copied and "package-lock.json" in copied
    runtime = stages[-1]
    assert runtime.image.startswith("python:") and "slim" in runtime.image


def test_base_images_are_pinned_never_latest(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    for s in stages:
        if s.image in names:
            continue  # FROM an earlier stage
        _repo, colon, tag = s.image.partition(":")
        assert colon and tag, f"{s.image}: no tag (means latest)"
        assert "latest" not in tag, s.image
        assert any(ch.isdigit() for ch in tag), f"{s.image}: tag names no version"


def test_novnc_tarball_goes_from_the_npm_stage_into_the_wheel(stages: list[Stage]) -> None:
    node = next(s for s in stages if s.image.startswith("node:"))
    wheel = next(s for s in stages if any("pip wheel" in r for r in s.all("RUN")))
    copies = wheel.all("COPY")
    # buildsupport/consoleproxy_build.py looks for the tarball in build/novnc/ and checks its sha512.
    assert any(c.startswith(f"--from={node.name} ") and c.endswith(" ./build/novnc") for c in copies), copies
    assert not any("novnc" in c for c in stages[-1].all("COPY")), "the wheel carries noVNC"


def test_runtime_runs_as_a_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    # Nothing after the last USER switches back to root.
    ops = [op for op, _ in stages[-1].instructions]
    last_user = len(ops) - 1 - ops[::-1].index("USER")
    assert "RUN" not in ops[last_user:], "RUN after USER runs as the service user; keep setup before it"


def test_healthcheck_probes_healthz_where_the_config_listens(stages: list[Stage], tmp_path: Path) -> None:
    from consoleproxy.healthcheck import healthz_url

    checks = stages[-1].all("HEALTHCHECK")
    assert len(checks) == 1 and "--interval=" in checks[0] and "--timeout=" in checks[0]
    assert json.loads(checks[0].split("CMD", 1)[1]) == ["python", "-m", "consoleproxy.healthcheck"]
    cfg = load_config(IMAGE_CONFIG, env={})
    assert healthz_url(cfg) == f"https://127.0.0.1:{cfg.listen.ports[0]}/healthz"


def test_exposed_ports_match_the_image_config(stages: list[Stage]) -> None:
    exposed = {p.split("/")[0] for e in stages[-1].all("EXPOSE") for p in e.split()}
    cfg = tomllib.loads(IMAGE_CONFIG.read_text())
    assert {str(p) for p in cfg["listen"]["ports"]} <= exposed
    assert str(cfg["admin"]["port"]) in exposed


def test_image_config_is_a_valid_consoleproxy_config(stages: list[Stage]) -> None:
    cfg = load_config(IMAGE_CONFIG, env={})
    assert cfg.listen.tls and not cfg.page.static_dir and not cfg.page.novnc_dir  # the wheel's copies
    # The file is copied to where CMD and CONSOLEPROXY_CONFIG say; the store is a directory it makes.
    copies = stages[-1].all("COPY")
    target = json.loads(stages[-1].all("CMD")[0])[3]
    assert f"docker/consoleproxy.toml {target}" in copies
    assert f"CONSOLEPROXY_CONFIG={target}" in stages[-1].all("ENV")
    assert any(cfg.tls.store in r and "mkdir" in r for r in stages[-1].all("RUN"))


def test_cmd_is_consoleproxy_serve_with_a_config(stages: list[Stage]) -> None:
    cmds = stages[-1].all("CMD")
    assert len(cmds) == 1
    argv = json.loads(cmds[0])  # exec form: signals reach consoleproxy (SIGTERM drains)
    assert argv[:3] == ["consoleproxy", "serve", "--config"] and len(argv) == 4
    args = build_parser().parse_args(argv[1:])
    assert args.config == argv[3]
    assert not stages[-1].all("ENTRYPOINT")


def test_apt_and_pip_hygiene(stages: list[Stage]) -> None:
    for s in stages:
        for run in s.all("RUN"):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "-y" in run
                assert "apt-get update" in run, "update and install in one layer (DL3009/DL3015)"
                assert "rm -rf /var/lib/apt/lists" in run
            if "pip install" in run or "pip wheel" in run:
                assert "--no-cache-dir" in run
            assert "sudo " not in run
            assert "curl " not in run and "wget " not in run, "fetch with npm/pip, not ad-hoc downloads"
        for wd in s.all("WORKDIR"):
            assert wd.startswith("/"), "WORKDIR must be absolute (DL3000)"


def test_copied_sources_exist_and_dockerignore_keeps_secrets_out(stages: list[Stage]) -> None:
    for s in stages:
        for c in s.all("COPY"):
            if c.startswith("--from="):
                continue
            for src in c.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".git", ".venv", "node_modules", "certs", "*.key", "keys.json"):
        assert must in ignored, must



# --- the Grafana dashboard (docs/grafana-dashboard.json) --------------------------------------

DESIGN_METRICS = (  # DESIGN.md section 9
    "sessions_active", "sessions_total", "bytes_total", "token_rejections_total",
    "backend_connect_seconds", "session_duration_seconds", "certificate_expiry_timestamp_seconds",
    "draining", "dns_queries_total",
)


def test_grafana_dashboard_covers_the_design_metrics_and_names_only_real_ones() -> None:
    import re

    from consoleproxy.metrics import Metrics

    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"consoleproxy_[a-z_]+", e)}
    # Every series a panel queries is one the proxy exports (a histogram's _bucket included).
    exported: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (consoleproxy_[a-z_]+) (\w+)", Metrics().render().decode(), re.M):
        exported.add(name)
        if kind == "counter":
            exported.add(name + "_total")
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
    for name in used:
        assert name in exported, f"dashboard queries unknown {name}"
    for metric in DESIGN_METRICS:
        assert any(f"consoleproxy_{metric}" in e for e in exprs), f"no panel for {metric}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_image_gets_uvloop(stages: list[Stage]) -> None:
    """serve runs on uvloop when it is installed; the image installs it with the package."""
    runs = [run for s in stages for run in s.all("RUN") if "pip wheel" in run]
    assert runs and all('".[uvloop]"' in run for run in runs), runs
