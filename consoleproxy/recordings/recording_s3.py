"""Recordings in an S3-compatible object store (``[recording] store = "s3://BUCKET/PREFIX"``).

For load-balanced proxies: every instance's recordings land in one bucket. A recording is written
to the local spool directory first (recording_store.FileStore, as in file mode: the console never
waits on the network) and uploaded once finished, segment by segment (multipart upload of
``PART_BYTES`` parts read from the file: never held whole in memory). While the store cannot be
reached the recordings wait in the spool and the uploader retries (``RETRY_SECONDS``); a file
leaves the spool only after its upload completed and was checked (the object's size). Nothing
is lost to an outage.

Objects: ``PREFIX/ID.cprec`` (the recording) and ``PREFIX/ID.json`` (its metadata, as listed).
Client: aiobotocore (the ``s3`` extra); credentials from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ...), as botocore reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from consoleproxy.errors import ConfigError
from consoleproxy.recordings.recording_store import SUFFIX, FileStore, check_id

__all__ = ["PART_BYTES", "RETRY_SECONDS", "S3Store"]

log = logging.getLogger("consoleproxy.recording")

PART_BYTES = 8 * 1024 * 1024  # one multipart part (S3's minimum is 5 MiB, except the last)
RETRY_SECONDS = 2.0  # between upload attempts while the store is unreachable
TIMEOUT_SECONDS = 10.0  # connect and read timeout of one request


class S3Store:
    """One bucket and prefix; uploads what the spool holds, lists, fetches and deletes."""

    def __init__(self, bucket: str, prefix: str, *, endpoint: str, region: str, spool: FileStore) -> None:
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError:
            raise ConfigError(
                "[recording] store: s3:// needs aiobotocore (pip install 'consoleproxy[s3]')"
            ) from None
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.spool = spool
        self._session = get_session()
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint or None,
            "region_name": region or None,
            "config": AioConfig(
                connect_timeout=TIMEOUT_SECONDS, read_timeout=TIMEOUT_SECONDS,
                retries={"max_attempts": 1}, s3={"addressing_style": "path"},
            ),
        }
        self.uploaded = 0  # recordings uploaded since start
        self.failures = 0  # failed upload attempts since start
        self._wake = asyncio.Event()

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[Any]:
        async with self._session.create_client("s3", **self._client_args) as client:
            yield client

    def key(self, rid: str, suffix: str) -> str:
        return f"{self.prefix}{check_id(rid)}{suffix}"

    # -- uploading ------------------------------------------------------------------------------

    def wake(self) -> None:
        """A recording finished: look at the spool now."""
        self._wake.set()

    async def upload_forever(self) -> None:
        while True:
            try:
                pending = await self.upload_spool()
            except Exception as exc:  # the store is down or refuses: keep the files, retry
                self.failures += 1
                log.warning("recording upload to s3://%s failed (retrying): %s", self.bucket, exc)
                pending = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETRY_SECONDS if pending else 60):
                    await self._wake.wait()
            self._wake.clear()

    async def upload_spool(self) -> bool:
        """Upload every finished recording in the spool; True when some are left (an error)."""
        metas = await asyncio.to_thread(self.spool.entries)
        done = [m for m in metas if m.get("state") in ("complete", "incomplete")]
        if not done:
            return False
        async with self._client() as client:
            for meta in done:
                rid = meta["id"]
                path = self.spool.dir / (rid + SUFFIX)
                await self._upload_file(client, path, self.key(rid, SUFFIX))
                body = json.dumps({**meta, "stored": "s3"}, sort_keys=True).encode()
                await client.put_object(Bucket=self.bucket, Key=self.key(rid, ".json"), Body=body)
                head = await client.head_object(Bucket=self.bucket, Key=self.key(rid, SUFFIX))
                if int(head["ContentLength"]) != await asyncio.to_thread(os.path.getsize, path):
                    raise OSError(f"uploaded size of {rid} differs from the spool's file")
                await asyncio.to_thread(self.spool.delete, rid)
                self.uploaded += 1
        return False

    async def _upload_file(self, client: Any, path: Path, key: str) -> None:
        size = await asyncio.to_thread(os.path.getsize, path)
        if size <= PART_BYTES:
            data = await asyncio.to_thread(path.read_bytes)
            await client.put_object(Bucket=self.bucket, Key=key, Body=data)
            return
        upload = await client.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id = upload["UploadId"]
        parts = []
        f = await asyncio.to_thread(open, path, "rb")
        try:
            number = 1
            while chunk := await asyncio.to_thread(f.read, PART_BYTES):
                part = await client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
                number += 1
            await client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        finally:
            f.close()

    # -- reading (admin API) --------------------------------------------------------------------

    async def entries(self) -> list[dict[str, Any]]:
        """The metadata of every uploaded recording."""
        out: list[dict[str, Any]] = []
        async with self._client() as client:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if not key.endswith(".json"):
                        continue
                    resp = await client.get_object(Bucket=self.bucket, Key=key)
                    async with resp["Body"] as body:
                        try:
                            meta = json.loads(await body.read())
                        except ValueError:
                            continue
                    if isinstance(meta, dict):
                        out.append(meta)
        return out

    async def fetch(self, rid: str, dest: Path) -> bool:
        """Download ``rid``'s recording into ``dest`` (streamed); False when there is none."""
        async with self._client() as client:
            try:
                resp = await client.get_object(Bucket=self.bucket, Key=self.key(rid, SUFFIX))
            except client.exceptions.NoSuchKey:
                return False
            f = await asyncio.to_thread(open, dest, "wb")
            try:
                async with resp["Body"] as body:
                    while chunk := await body.read(1024 * 1024):
                        await asyncio.to_thread(f.write, chunk)
            finally:
                f.close()
        return True

    async def delete(self, rid: str) -> bool:
        async with self._client() as client:
            try:
                await client.head_object(Bucket=self.bucket, Key=self.key(rid, ".json"))
            except client.exceptions.ClientError:
                return False
            for suffix in (SUFFIX, ".json"):
                await client.delete_object(Bucket=self.bucket, Key=self.key(rid, suffix))
        return True
