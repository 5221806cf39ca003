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

    def create(self, stream: BinaryIO, *, filename: str, purpose: str, owner: str) -> dict[str, Any]:
        """Store an upload, streamed to disk; refuses one over `max_bytes`.

        Raises:
            InputTooLargeError: the upload is over the file size limit (nothing is kept).
        """
        file_id = new_id("file-")
        target = self.path(file_id)
        partial = target.with_suffix(".part")
        size = 0
        try:
            with partial.open("wb") as out:
                while block := stream.read(1 << 20):
                    size += len(block)
                    if size > self.max_bytes:
                        raise InputTooLargeError(
                            f"{filename} is over the limit of {self.max_bytes:,} bytes: split it or "
                            "raise CHATBATCH_MAX_FILE_BYTES"
                        )
                    out.write(block)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        record: dict[str, Any] = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
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
