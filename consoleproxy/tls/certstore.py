"""Certificate store: CloudStack-style items in, verified TLS bundles out (DESIGN.md section 6).

Inputs mirror CloudStack's ``uploadCustomCertificate``: items named by the operator, each with an
``id`` (1 root, 2... intermediates, server certificate last), a PEM certificate, and for the server
item a private key and the domain suffix (``*.consoleproxy.company.com``) or FQDN it serves.

The certificate code is split by concern: PEM parsing and repair in certpem.py, chain
verification in certchain.py, the listeners' SNI contexts in certsni.py; this module is the store
on disk. The names other modules and the CLI imported from here before the split are re-exported.

On-disk layout of a store directory::

    items/<name>.json        staged input items: {"name", "id", "certificate", "privatekey",
                             "domainsuffix"}; the key (if any) is stored decrypted as PKCS#8,
                             so every item file is 0600
    bundles/<key>-<stamp>/   one verified bundle, never modified after it is written:
        chain.pem            leaf then intermediates: what the server sends (the root is not sent,
                             a client must already trust it)
        root.pem             the trust anchor, kept so ``verify`` can re-check the whole chain
        key.pem              unencrypted PKCS#8 for the ssl module, 0600
        meta.json            key, names, not_after, fingerprint, created, items, digest
    live/<key>               symlink -> ../bundles/<dir>, one per domain suffix / FQDN
    previous/<key>           symlink to the bundle that was live before (for ``rollback``)
    .lock                    flock serialising writers (CLI and admin API may import at once)

``<key>`` is the suffix or FQDN with a wildcard written ``_.`` (``_.consoleproxy.company.com``):
``_`` is not a valid host-name character, so a wildcard key never collides with an FQDN key.
Going live replaces a symlink with ``os.replace``, which is atomic: a reader sees the old bundle
or the new one, never a mix, and a failed import leaves the live bundle byte-identical.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization

from consoleproxy.atomicfile import write_atomic
from consoleproxy.tls.certchain import (
    DEV_SERVER_ITEM,
    EXPIRY_WARNING,
    Item,
    VerifiedBundle,
    bundle_key,
    default_bundle_key,
    dirname_key,
    dn,
    ip_or_dns,
    item_key,
    key_dirname,
    parse_item,
    verify_bundle,
)
from consoleproxy.tls.certpem import (
    CertificateError,
    ServerKey,
    item_error,
    parse_certificate_pem,
    parse_private_key_pem,
    split_pem_certs,
)
from consoleproxy.tls.certsni import SNIContexts, make_ssl_context

# CertStore, ImportResult and the two writers are this module's. The other names are the ones
# code imported from here before the split, re-exported so that code (and issue 17's other
# branches, merged after this one) keeps working; new code imports them from certpem, certchain
# and certsni.
__all__ = [
    "DEV_SERVER_ITEM",
    "EXPIRY_WARNING",
    "CertStore",
    "CertificateError",
    "ImportResult",
    "Item",
    "SNIContexts",
    "ServerKey",
    "VerifiedBundle",
    "bundle_key",
    "ip_or_dns",
    "item_entry",
    "make_ssl_context",
    "parse_certificate_pem",
    "parse_private_key_pem",
    "verify_bundle",
    "write_bundle",
]


# --------------------------------------------------------------------------------------------------
# The store on disk


@dataclass
class ImportResult:
    item: str
    status: str  # "live" (a bundle went live), "staged" (waiting for more items), "unchanged"
    message: str
    warnings: list[str] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)
    bundles: list[dict[str, Any]] = field(default_factory=list)


def _write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    write_atomic(path, data, mode=mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)  # rename(2) over the old symlink: atomic




def write_bundle(bundles_dir: Path, bundle: VerifiedBundle, now: dt.datetime) -> tuple[Path, dict[str, Any]]:
    """A new bundle directory under ``bundles_dir``, written whole (files fsynced, then renamed)."""
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    d = bundles_dir / f"{key_dirname(bundle.key_name)}-{stamp}-{secrets.token_hex(3)}"
    tmp = d.with_name("." + d.name + ".tmp")
    tmp.mkdir(mode=0o700)
    meta: dict[str, Any] = {
        "key": bundle.key_name,
        "names": bundle.names,
        "not_after": bundle.not_after.isoformat(),
        "fingerprint": bundle.fingerprint,
        "subject": dn(bundle.leaf.subject),
        "issuer": dn(bundle.leaf.issuer),
        "created": now.isoformat(),
        "items": bundle.items,
        "digest": bundle.digest(),
        "warnings": bundle.warnings,
    }
    _write_file(tmp / "chain.pem", bundle.pem_chain())
    _write_file(tmp / "root.pem", bundle.pem_root())
    _write_file(tmp / "key.pem", bundle.pem_key(), 0o600)
    _write_file(tmp / "meta.json", json.dumps(meta, indent=1).encode())
    _fsync_dir(tmp)
    os.rename(tmp, d)
    _fsync_dir(bundles_dir)
    return d, meta


def item_entry(it: Item) -> dict[str, Any]:
    """One staged item as ``CertStore.list`` shows it (never its key)."""
    entry: dict[str, Any] = {"type": "item", "name": it.name, "id": it.id}
    try:
        cert = parse_certificate_pem(it.certificate, it.name)
    except CertificateError as exc:
        entry["error"] = str(exc)
    else:
        entry |= {
            "subject": dn(cert.subject),
            "issuer": dn(cert.issuer),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
        }
    entry["has_private_key"] = it.private_key is not None
    if it.domain_suffix:
        entry["domainsuffix"] = it.domain_suffix
    return entry


class CertStore:
    """The store directory (layout in the module docstring). Writers hold an flock."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.items_dir = self.directory / "items"
        self.bundles_dir = self.directory / "bundles"
        self.live_dir = self.directory / "live"
        self.previous_dir = self.directory / "previous"

    # -- reading --------------------------------------------------------------------------------

    def items(self) -> list[Item]:
        if not self.items_dir.is_dir():
            return []
        out: list[Item] = []
        for path in sorted(self.items_dir.glob("*.json")):
            data = json.loads(path.read_text())
            out.append(
                Item(
                    name=data["name"],
                    id=int(data["id"]),
                    certificate=data["certificate"],
                    private_key=data.get("privatekey") or None,
                    domain_suffix=data.get("domainsuffix") or None,
                )
            )
        return sorted(out, key=lambda i: (i.id, i.name))

    def _bundle_dir(self, which: Path, key: str) -> Path | None:
        link = which / key_dirname(key)
        if not link.is_symlink() and not link.exists():
            return None
        real = link.resolve()
        return real if real.is_dir() else None

    def _keys(self, which: Path) -> list[str]:
        if not which.is_dir():
            return []
        return sorted(dirname_key(p.name) for p in which.iterdir() if not p.name.startswith("."))

    def live_bundles(self) -> dict[str, tuple[Path, Path]]:
        """key -> (chain.pem, key.pem), resolved once so both files come from the same bundle."""
        out: dict[str, tuple[Path, Path]] = {}
        for key in self._keys(self.live_dir):
            d = self._bundle_dir(self.live_dir, key)
            if d is not None and (d / "chain.pem").is_file() and (d / "key.pem").is_file():
                out[key] = (d / "chain.pem", d / "key.pem")
        return out

    def live_paths(self, key: str | None = None) -> tuple[Path, Path] | None:
        """(chain.pem, key.pem) of ``key``'s bundle, or of the default one (wildcards first)."""
        bundles = self.live_bundles()
        if not bundles:
            return None
        if key is None:
            return bundles[default_bundle_key(list(bundles))]
        return bundles.get(bundle_key(key))

    def _meta(self, d: Path | None) -> dict[str, Any] | None:
        if d is None or not (d / "meta.json").is_file():
            return None
        meta: dict[str, Any] = json.loads((d / "meta.json").read_text())
        meta["directory"] = str(d)
        return meta

    def verify(self, key: str | None = None, *, now: dt.datetime | None = None) -> VerifiedBundle:
        """Re-checks a live bundle from its files (dates against ``now``); raises when missing/invalid."""
        bundles = self.live_bundles()
        if not bundles:
            raise CertificateError(f"no live certificate bundle in {self.directory}")
        k = default_bundle_key(list(bundles)) if key is None else bundle_key(key)
        if k not in bundles:
            raise CertificateError(f"no live certificate bundle for {k!r} in {self.directory}")
        d = bundles[k][0].parent
        meta = self._meta(d) or {}
        certs = split_pem_certs((d / "chain.pem").read_text())
        root = (d / "root.pem").read_text() if (d / "root.pem").is_file() else ""
        if root and (not certs or root.strip() != certs[0].strip()):
            certs.append(root)
        if not certs:
            raise CertificateError(f"live bundle {d} has no certificate")
        names = list(meta.get("items") or [])
        if len(names) != len(certs):
            names = ["server"] + [f"chain{i}" for i in range(1, len(certs))]
        items = [Item(names[0], len(certs), certs[0], (d / "key.pem").read_text(), k)]
        items += [
            Item(n, len(certs) - i, c) for i, (n, c) in enumerate(zip(names[1:], certs[1:], strict=True), 1)
        ]
        return verify_bundle(items, now=now)

    # -- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def import_item(
        self, item: Item, passphrase: bytes | str | None = None, *, now: dt.datetime | None = None
    ) -> ImportResult:
        """Adds or replaces ``item``; a complete chain goes live, an invalid item is not stored."""
        now = now or dt.datetime.now(dt.UTC)
        with self._locked():
            return self._import(item, passphrase, now)

    def _import(self, item: Item, passphrase: bytes | str | None, now: dt.datetime) -> ImportResult:
        warnings: list[str] = []
        existing = {i.name: i for i in self.items()}
        if item.private_key and not item.domain_suffix and existing.get(item.name, item).domain_suffix:
            # Renewal under the same name may omit the suffix: keep the one already stored.
            item = Item(
                item.name, item.id, item.certificate, item.private_key, existing[item.name].domain_suffix
            )
        parsed = parse_item(item, passphrase, now, warnings)
        # Store canonical text: repaired base64, and the key decrypted to PKCS#8 (the file is 0600).
        stored = Item(
            item.name,
            item.id,
            parsed.cert.public_bytes(serialization.Encoding.PEM).decode(),
            None
            if parsed.key is None
            else parsed.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
            item_key(item) if parsed.key is not None else None,
        )
        items = {**existing, stored.name: stored}
        cas = [i for i in items.values() if i.private_key is None]
        servers = [i for i in items.values() if i.private_key is not None]

        built: list[VerifiedBundle] = []
        waiting: list[str] = []
        if stored.private_key is not None:
            for other in servers:
                if other.name == DEV_SERVER_ITEM != stored.name:
                    continue  # a development certificate gives way to the first real one
                if other.name != stored.name and other.domain_suffix == stored.domain_suffix:
                    raise item_error(
                        stored.name,
                        f"{stored.domain_suffix!r} is already served by item {other.name!r}; upload under "
                        "that name to replace it",
                    )
            # The server item is the trigger: its chain must verify now, else nothing changes.
            bundle = verify_bundle([stored, *cas], now=now)
            built.append(bundle)
            warnings.extend(bundle.warnings)
        else:
            if not servers:
                waiting.append("server certificate")
            for server in servers:
                try:
                    bundle = verify_bundle([server, *cas], now=now)
                except CertificateError as exc:
                    waiting.append(f"server certificate matching the new chain ({exc})")
                else:
                    built.append(bundle)
                    warnings.extend(bundle.warnings)
            ca_certs = [(ca.name, parse_certificate_pem(ca.certificate, ca.name)) for ca in cas]
            subjects = {cert.subject for _n, cert in ca_certs}
            for name, cert in ca_certs:
                if cert.issuer != cert.subject and cert.issuer not in subjects:
                    waiting.append(f"issuer of item {name!r} ('{dn(cert.issuer)}')")

        went_live = self._commit(stored, existing.get(stored.name), built, now)
        if went_live and stored.private_key is not None and stored.name != DEV_SERVER_ITEM:
            dev = self.items_dir / f"{DEV_SERVER_ITEM}.json"
            if dev.exists() and DEV_SERVER_ITEM in existing and (
                existing[DEV_SERVER_ITEM].domain_suffix == stored.domain_suffix
            ):
                dev.unlink()
        warnings = list(dict.fromkeys(warnings))
        if went_live:
            keys = ", ".join(repr(m["key"]) for m in went_live)
            msg = f"live: {keys}"
            if waiting:
                msg += "; still waiting for: " + "; ".join(waiting)
            return ImportResult(stored.name, "live", msg, warnings, waiting, went_live)
        if built:
            return ImportResult(stored.name, "unchanged", "stored; the live bundle is unchanged", warnings)
        return ImportResult(
            stored.name, "staged", "staged, waiting for: " + "; ".join(waiting), warnings, waiting
        )

    def _commit(
        self, stored: Item, replaced: Item | None, built: list[VerifiedBundle], now: dt.datetime
    ) -> list[dict[str, Any]]:
        """Writes bundles, then the item, then swaps links; the old item returns if anything fails."""
        for d in (self.items_dir, self.bundles_dir, self.live_dir, self.previous_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.items_dir.chmod(0o700)  # item files hold decrypted keys
        new_dirs: list[tuple[str, Path, dict[str, Any]]] = []
        for bundle in built:
            live_meta = self._meta(self._bundle_dir(self.live_dir, bundle.key_name))
            if live_meta is not None and live_meta.get("digest") == bundle.digest():
                continue
            new_dirs.append((bundle.key_name, *write_bundle(self.bundles_dir, bundle, now)))
        item_path = self.items_dir / f"{stored.name}.json"
        old_bytes = item_path.read_bytes() if replaced is not None and item_path.is_file() else None
        record = {
            "name": stored.name,
            "id": stored.id,
            "certificate": stored.certificate,
            "privatekey": stored.private_key,
            "domainsuffix": stored.domain_suffix,
        }
        try:
            _write_file(item_path, json.dumps(record, indent=1).encode(), 0o600)
            _fsync_dir(self.items_dir)
            for key, d, _meta in new_dirs:
                name = key_dirname(key)
                old = self.live_dir / name
                if old.is_symlink():
                    _swap_link(self.previous_dir / name, os.readlink(old))
                _swap_link(old, f"../bundles/{d.name}")
            _fsync_dir(self.live_dir)
            _fsync_dir(self.previous_dir)
        except BaseException:
            if old_bytes is not None:
                _write_file(item_path, old_bytes, 0o600)
            elif replaced is None:
                item_path.unlink(missing_ok=True)
            raise
        self._collect_garbage()
        return [meta for _k, _d, meta in new_dirs]

    def _collect_garbage(self) -> None:
        """Only bundles that live/ or previous/ point at are kept."""
        keep = set()
        for which in (self.live_dir, self.previous_dir):
            for key in self._keys(which):
                d = self._bundle_dir(which, key)
                if d is not None:
                    keep.add(d.name)
        for d in self.bundles_dir.iterdir():
            if d.is_dir() and d.name not in keep and not d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)

    def rollback(self, key: str | None = None) -> dict[str, Any]:
        """Swaps previous and live for ``key`` (default: the only/default bundle); returns new live meta."""
        with self._locked():
            keys = self._keys(self.previous_dir)
            if key is not None:
                k = bundle_key(key)
            elif keys:
                live = self._keys(self.live_dir)
                k = default_bundle_key(live) if live else keys[0]
            else:
                raise CertificateError(f"no previous certificate bundle in {self.directory}")
            name = key_dirname(k)
            prev_link, live_link = self.previous_dir / name, self.live_dir / name
            prev_dir = self._bundle_dir(self.previous_dir, k)
            if prev_dir is None:
                raise CertificateError(f"no previous certificate bundle for {k!r} in {self.directory}")
            prev_target = os.readlink(prev_link)
            live_target = os.readlink(live_link) if live_link.is_symlink() else None
            _swap_link(live_link, prev_target)
            if live_target is not None:
                # Keeping the replaced bundle as "previous" makes a second rollback undo the first.
                _swap_link(prev_link, live_target)
            else:
                prev_link.unlink()
            _fsync_dir(self.live_dir)
            _fsync_dir(self.previous_dir)
            meta = self._meta(prev_dir)
            assert meta is not None
            return meta

    # Defined last: inside the class body the name shadows the builtin used in annotations above.
    def list(self) -> list[dict[str, Any]]:
        """Items (never their keys) then one entry per live and previous bundle."""
        out: list[dict[str, Any]] = [item_entry(it) for it in self.items()]
        for which, label in ((self.live_dir, "live"), (self.previous_dir, "previous")):
            for key in self._keys(which):
                meta = self._meta(self._bundle_dir(which, key))
                if meta is not None:
                    out.append({"type": label, **meta})
        return out
