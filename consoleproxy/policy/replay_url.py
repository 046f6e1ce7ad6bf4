"""Store URLs: ``[cluster] replay_store`` parsed and checked, without the network or the disk.

:func:`parse_store_url` turns ``memory``, ``sqlite:///FILE``, ``redis[s]://HOST[:PORT][/DB]`` or
``redis[s]+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`` into a :class:`StoreURL`, or raises
:class:`BadStoreURL` saying what is wrong; :func:`redact_url` hides a URL's password for logs and
messages. Opening the store a URL names is :func:`consoleproxy.policy.replay_open.open_replay_store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from consoleproxy.errors import ConsoleProxyError

__all__ = [
    "BadStoreURL",
    "StoreURL",
    "parse_store_url",
    "redact_url",
]


class BadStoreURL(ConsoleProxyError, ValueError):
    """``[cluster] replay_store`` is not ``memory``, ``sqlite:///FILE``, ``redis[s]://HOST[:PORT][/DB]``
    or ``redis[s]+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]``."""



SENTINEL_PORT = 26379  # Redis Sentinel's registered port, for an address written without one
# Query options of a Sentinel URL. TLS ones (rediss+sentinel only) have redis-py's names and
# meanings and apply to the Sentinels and to the data servers alike; ``sentinel_auth=yes`` sends
# the URL's user and password to the Sentinels too (by default only to the data servers).
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SENTINEL_OPTIONS = ("sentinel_auth",)
_YES_NO = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


@dataclass(frozen=True)
class StoreURL:
    """A parsed ``[cluster] replay_store``."""

    kind: Literal["memory", "sqlite", "redis", "sentinel"]
    path: str = ""  # sqlite: the file as written; relative = relative to the configuration file
    url: str = ""  # redis: the URL as written, for redis-py; sentinel: as written (for messages)
    # sentinel only:
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr that may be logged
    sentinel_auth: bool = False
    tls_options: tuple[tuple[str, str | bool], ...] = ()


def parse_store_url(text: str) -> StoreURL:
    """Check a store URL without touching the network or the disk; :class:`BadStoreURL` if wrong.

    SQLite follows SQLAlchemy's spelling: three slashes then a relative path, four for an
    absolute one (``sqlite:////var/lib/consoleproxy/replay.db``).
    """
    t = text.strip()
    if not t:
        raise BadStoreURL("empty")
    if t == "memory":
        return StoreURL("memory")
    scheme, sep, _ = t.partition(":")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        if not t.startswith("sqlite:///"):
            raise BadStoreURL("a SQLite URL has no host: sqlite:///relative.db or sqlite:////absolute.db")
        path = t[len("sqlite:///") :]
        if not path or path.endswith("/"):
            raise BadStoreURL("the SQLite URL names no file")
        if "?" in path or "#" in path:
            raise BadStoreURL("a SQLite URL takes no query or fragment")
        if path == ":memory:":
            raise BadStoreURL("an in-memory SQLite database is not shared; use memory")
        return StoreURL("sqlite", path=path)
    if sep and scheme in ("redis", "rediss"):
        parts = urlsplit(t)
        if not t[len(scheme) :].startswith("://"):
            raise BadStoreURL(f"write {scheme}://HOST[:PORT][/DB]")
        if not parts.hostname:
            raise BadStoreURL("the Redis URL names no host")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise BadStoreURL("the Redis port must be 1-65535")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise BadStoreURL(f"the Redis database must be a number, not {db[:20]!r}")
        if parts.fragment:
            raise BadStoreURL("a Redis URL takes no fragment")
        return StoreURL("redis", url=t)
    if sep and scheme in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel_url(t, scheme)
    raise BadStoreURL(f"unknown store {t.partition(':')[0][:20]!r}")


def _sentinel_address(entry: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (port 26379)."""
    item = entry.strip()
    bad_port = BadStoreURL(f"the Sentinel port must be 1-65535 (bad entry {item[:60]!r})")
    if item.startswith("["):
        host, close, rest = item[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise BadStoreURL(f"bad Sentinel address {item[:60]!r}")
        port_text = rest[1:] if rest else str(SENTINEL_PORT)
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            host, port_text = item, str(SENTINEL_PORT)
    if not host:
        raise BadStoreURL(f"a Sentinel address names no host (entry {item[:60]!r})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad_port
    return host, int(port_text)


def _parse_sentinel_url(t: str, scheme: str) -> StoreURL:
    form = f"{scheme}://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
    if not t[len(scheme) :].startswith("://"):
        raise BadStoreURL(f"write {form}")
    rest = t[len(scheme) + 3 :]
    rest, hash_, _ = rest.partition("#")
    if hash_:
        raise BadStoreURL("a Sentinel URL takes no fragment")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not hosts.strip():
        raise BadStoreURL(f"the Sentinel URL names no Sentinel: write {form}")
    sentinels = tuple(_sentinel_address(h) for h in hosts.split(","))
    segments = path.rstrip("/").split("/") if path.strip("/") else []
    if not segments or not segments[0]:
        raise BadStoreURL(f"the Sentinel URL names no service: write {form}")
    service = unquote(segments[0])
    if len(segments) == 1 and service.isdigit():
        raise BadStoreURL(
            f"the Sentinel URL names no service ({service!r} looks like a database number): write {form}"
        )
    if len(segments) > 2:
        raise BadStoreURL(f"too many parts after the Sentinels: write {form}")
    if any(c.isspace() for c in service):
        raise BadStoreURL(f"the Sentinel service name has white space: {service[:40]!r}")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise BadStoreURL(f"the Redis database must be a number, not {segments[1][:20]!r}")
        db = int(segments[1])
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    tls = scheme == "rediss+sentinel"
    sentinel_auth = False
    tls_options: list[tuple[str, str | bool]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _SENTINEL_OPTIONS or name == "ssl_check_hostname":
            flag = _YES_NO.get(value.lower())
            if flag is None:
                raise BadStoreURL(f"option {name} takes yes or no, not {value[:20]!r}")
            if name == "sentinel_auth":
                sentinel_auth = flag
                continue
            tls_options.append((name, flag))
        elif name in _TLS_OPTIONS:
            if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
                raise BadStoreURL(
                    f"option ssl_cert_reqs takes none, optional or required, not {value[:20]!r}"
                )
            tls_options.append((name, value))
        else:
            raise BadStoreURL(
                f"unknown option {name[:30]!r} (known: {', '.join(_SENTINEL_OPTIONS + _TLS_OPTIONS)})"
            )
        if not tls:
            raise BadStoreURL(f"option {name} needs TLS: write rediss+sentinel://")
    return StoreURL(
        "sentinel", url=t, sentinels=sentinels, service=service, db=db, tls=tls,
        username=username, password=password, sentinel_auth=sentinel_auth, tls_options=tuple(tls_options),
    )


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "(unreadable URL)"
