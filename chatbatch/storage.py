"""Where job files live: local paths and `s3://bucket/key` URLs.

S3 goes through boto3 with its own credential chain (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
profiles, roles), its transfer manager (multipart for large objects) and its retries. Inputs are
streamed to a spooled temporary file, so memory does not grow with the file; outputs are written
to a temporary file and uploaded whole, so an object appears complete or not at all (a failed
multipart upload is aborted by the transfer manager).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from chatbatch.exceptions import ChatbatchError, ConfigurationError

#: Kept in memory up to this size, then on disk.
_SPOOL_BYTES = 8 * 1024 * 1024


class StorageError(ChatbatchError):
    """A read or write of a job file failed after boto3's retries.

    `transient` says whether trying again later may help (the store is unreachable or busy),
    as opposed to a refusal such as a missing bucket or denied access.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _transient(error: Exception) -> bool:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return True  # no answer from the store at all: connection refused, reset, timed out
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(response.get("Error", {}).get("Code", ""))
    return status >= 500 or status in (408, 429) or code in ("SlowDown", "Throttling", "RequestTimeout")


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3(url: str) -> S3Url | None:
    """The bucket and key of an s3:// URL; None for a local path."""
    if not url.startswith("s3://"):
        return None
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ConfigurationError(f"{url} is not an S3 object URL: write s3://bucket/path/file.jsonl")
    return S3Url(bucket, key)


def is_remote(url: str | None) -> bool:
    return bool(url) and str(url).startswith("s3://")


def s3_client(*, attempts: int = 5, connect_timeout: float = 5, read_timeout: float = 60) -> Any:
    """A boto3 S3 client with standard retries (exponential backoff with jitter)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.session.Session().client("s3", config=config)


def _describe(error: Exception) -> str:
    code = getattr(error, "response", {}).get("Error", {}).get("Code") if hasattr(error, "response") else None
    return f"{code}" if code else type(error).__name__


@contextmanager
def open_input(source: str, *, client: Any = None) -> Iterator[tuple[IO[bytes], int, str]]:
    """Open a job's input: (binary stream, size in bytes, canonical name).

    Raises:
        ConfigurationError: the file or object cannot be read.
    """
    url = parse_s3(source)
    if url is None:
        path = Path(source).expanduser()
        try:
            stream = path.open("rb")
        except OSError as error:
            raise ConfigurationError(f"cannot read {source}: {error.strerror}: check the path") from None
        with stream:
            yield stream, os.fstat(stream.fileno()).st_size, str(path.resolve())
        return
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or s3_client()
    try:
        head = client.head_object(Bucket=url.bucket, Key=url.key)
    except (ClientError, BotoCoreError) as error:
        raise ConfigurationError(
            f"cannot read {url} ({_describe(error)}): check the bucket, the key and the AWS "
            "credentials (boto3's chain: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles)"
        ) from None
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        try:
            client.download_fileobj(url.bucket, url.key, spool)
        except (ClientError, BotoCoreError) as error:
            raise ConfigurationError(f"cannot download {url} ({_describe(error)})") from None
        spool.seek(0)
        yield spool, int(head["ContentLength"]), str(url)  # type: ignore[misc]


class OutputFile:
    """A JSONL file that appears at its destination complete, or not at all."""

    def __init__(self, dest: str, *, client: Any = None, multipart_threshold: int = 8 * 1024 * 1024) -> None:
        self.dest = dest
        self.url = parse_s3(dest)
        self._client = client
        self._threshold = multipart_threshold
        if self.url is None:
            path = Path(dest).expanduser()
            if not path.parent.exists():
                raise ConfigurationError(f"cannot write {dest}: directory {path.parent} does not exist")
            self.path: Path | None = path
            fd, self._tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            self._file: IO[bytes] = os.fdopen(fd, "wb")
        else:
            self.path = None
            self._tmp = ""
            self._file = tempfile.TemporaryFile()

    @property
    def stream(self) -> IO[bytes]:
        """The file being written (a Parquet writer writes into it)."""
        return self._file

    def write_line(self, line: str) -> None:
        self._file.write(line.encode("utf-8"))
        self._file.write(b"\n")

    def write(self, number: int, line: str) -> None:
        """Add the output or error line of input line `number` (JSONL: the line as it is)."""
        self.write_line(line)

    def commit(self) -> None:
        """Publish the file: an atomic rename, or one (multipart when large) upload."""
        if self.path is not None:
            self._file.close()
            os.replace(self._tmp, self.path)
            self._tmp = ""
            return
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        url = parse_s3(self.dest)
        if url is None:
            raise ValueError(f"{self.dest} is neither a local path nor an s3:// URL")
        self._file.flush()
        self._file.seek(0)
        client = self._client or s3_client()
        config = TransferConfig(multipart_threshold=self._threshold, multipart_chunksize=max(self._threshold, 5 * 1024 * 1024))
        try:
            client.upload_fileobj(self._file, url.bucket, url.key, Config=config)
        except (ClientError, BotoCoreError) as error:
            raise StorageError(
                f"cannot upload {url} ({_describe(error)}); nothing was written there",
                transient=_transient(error),
            ) from None
        finally:
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)
            self._tmp = ""
