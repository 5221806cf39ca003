"""Files uploaded through the HTTP API (`/v1/files`, purpose `batch`): content on disk under
CHATBATCH_FILES_DIR (shared by every gateway), the file object in Redis. Each file belongs to
the API key that uploaded it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

import redis

from chatbatch import keys
from chatbatch.exceptions import InputTooLargeError
from chatbatch.ids import new_id
from chatbatch.redisconn import Fields, text, texts


class FileStore:
    """Uploaded files. Thread-safe.

    Args:
        client: the Redis connection.
        directory: where the content goes (created if missing).
        max_bytes: the largest upload accepted.
    """

    def __init__(self, client: redis.Redis, directory: Path, *, max_bytes: int) -> None:
        self.redis = client
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.directory / f"{file_id}.jsonl"

    def upload(self, filename: str) -> Upload:
        """A new upload, to be written block by block as it arrives."""
        return Upload(self, filename)

    def _record(self, upload: Upload, *, purpose: str, owner: str) -> dict[str, Any]:
        file_id = new_id("file-")
        os.replace(upload.partial, self.path(file_id))
        record: dict[str, Any] = {
            "id": file_id,
            "object": "file",
            "bytes": upload.size,
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": purpose,
            "status": "processed",
            "owner": owner,
        }
        pipe = self.redis.pipeline()
        pipe.hset(keys.file(file_id), mapping=cast(Fields, record))
        pipe.zadd(keys.FILES, {file_id: record["created_at"]})
        pipe.execute()
        return record

    def get(self, file_id: str) -> dict[str, Any] | None:
        record: dict[str, Any] = texts(self.redis.hgetall(keys.file(file_id)))
        if not record:
            return None
        record["bytes"] = int(record["bytes"])
        record["created_at"] = int(record["created_at"])
        return record

    def list(self, owner: str) -> list[dict[str, Any]]:
        files = []
        for raw in self.redis.zrevrange(keys.FILES, 0, -1):
            record = self.get(text(raw))
            if record is not None and record["owner"] == owner:
                files.append(record)
        return files

    def delete(self, file_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(keys.file(file_id))
        pipe.zrem(keys.FILES, file_id)
        pipe.execute()
        self.path(file_id).unlink(missing_ok=True)


class Upload:
    """An upload being written: its content goes to a partial file in the store's directory
    as it arrives, counted against the store's limit before each block is written, so no more
    than `max_bytes` is ever written; `keep` makes it a file (and mints its id), `discard`
    drops it. Not thread-safe: one writer at a time.
    """

    def __init__(self, store: FileStore, filename: str) -> None:
        self.store = store
        self.filename = filename
        self.size = 0
        self.partial = store.directory / f"upload-{new_id('')}.part"
        self._out: BinaryIO | None = self.partial.open("wb")

    def write(self, block: bytes) -> None:
        """Append a block.

        Raises:
            InputTooLargeError: the block would take the upload over the limit (it is not
                written; the upload is discarded).
        """
        if self.size + len(block) > self.store.max_bytes:
            self.discard()
            raise InputTooLargeError(
                f"{self.filename} is over the limit of {self.store.max_bytes:,} bytes: split it or "
                "raise CHATBATCH_MAX_FILE_BYTES"
            )
        if self._out is None:
            raise ValueError("the upload was kept or discarded already")
        self._out.write(block)
        self.size += len(block)

    def keep(self, *, purpose: str, owner: str) -> dict[str, Any]:
        """The upload as a stored file: its record (with its new id)."""
        if self._out is None:
            raise ValueError("the upload was discarded already")
        self._out.close()
        self._out = None
        try:
            return self.store._record(self, purpose=purpose, owner=owner)
        finally:
            self.partial.unlink(missing_ok=True)

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.partial.unlink(missing_ok=True)
