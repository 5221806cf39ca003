"""`POST /v1/files` bodies parsed as they stream in.

FastAPI's `UploadFile` spools the whole multipart part to a temporary file before the handler
runs, so a limit checked in the handler comes after the bytes have landed. Here the body is
read from the request stream and fed to python-multipart's streaming parser: the `file` part's
content goes to the file store's partial file in blocks, counted against
CHATBATCH_MAX_FILE_BYTES before each block is written, and the other fields (`purpose`) are
kept in memory up to a few KB each. Nothing else is written anywhere, and memory holds at most
one block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.errors import ApiError
from gateway.files import FileStore, Upload

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

#: The multipart part that carries the file, as OpenAI names it.
FILE_FIELD = "file"
#: Bytes of file content gathered before a write (one write per block, in a thread).
BLOCK = 1 << 20
#: Most bytes of a field other than the file, and most fields.
MAX_FIELD_BYTES = 4096
MAX_FIELDS = 16


def _refuse(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_request")


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Parser:
    """python-multipart's callbacks: fields into memory, the file part's bytes into `pending`
    (written by `receive` between two chunks of the stream, outside the parser's callbacks)."""

    def __init__(self, files: FileStore) -> None:
        self.files = files
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self.pending = bytearray()
        self._part = _Part()
        self._header = (bytearray(), bytearray())
        self._in_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header[1].extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._part = _Part()
        self._in_file = False

    def _header_end(self) -> None:
        name, value = self._header
        self._part.headers.append((bytes(name).lower(), bytes(value)))
        self._header = (bytearray(), bytearray())

    def _headers_finished(self) -> None:
        disposition = next((value for name, value in self._part.headers if name == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise _refuse("a multipart part has no name in its Content-Disposition header")
        self._part.name = options[b"name"].decode("utf-8", errors="replace")
        if b"filename" in options:
            self._part.filename = options[b"filename"].decode("utf-8", errors="replace")
        if self._part.name == FILE_FIELD:
            if self.upload is not None:
                raise _refuse("send one 'file' part", param=FILE_FIELD)
            self.upload = self.files.upload(self._part.filename or "upload.jsonl")
            self._in_file = True
        elif len(self.fields) >= MAX_FIELDS:
            raise _refuse(f"at most {MAX_FIELDS} form fields are accepted")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending += data[start:end]
            return
        self._part.data += data[start:end]
        if len(self._part.data) > MAX_FIELD_BYTES:
            raise _refuse(f"the form field '{self._part.name[:40]}' is over {MAX_FIELD_BYTES} bytes", param=self._part.name[:40])

    def _end(self) -> None:
        if not self._in_file:
            self.fields[self._part.name] = self._part.data.decode("utf-8", errors="replace")


async def receive(request: Request, files: FileStore) -> tuple[Upload, dict[str, str]]:
    """Read a multipart/form-data upload from the request stream: the `file` part written to
    the store as it arrives (not kept yet: the caller keeps or discards it), and the other
    fields.

    Raises:
        ApiError: 400, not multipart, malformed, or without a `file` part.
        InputTooLargeError: the file is over the limit (nothing of it is kept).
    """
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise _refuse("upload files as multipart/form-data, with a 'file' part and a 'purpose' field")
    parser = _Parser(files)
    multipart = MultipartParser(options[b"boundary"], parser.callbacks())
    try:
        async for chunk in request.stream():
            multipart.write(chunk)
            if parser.upload is not None and len(parser.pending) >= BLOCK:
                await _flush(parser)
        multipart.finalize()
        if parser.upload is None:
            raise _refuse("'file' is required: send the file as a multipart part named 'file'", param=FILE_FIELD)
        await _flush(parser)
    except BaseException as error:
        if parser.upload is not None:
            parser.upload.discard()
        if isinstance(error, FormParserError):
            raise _refuse(f"the multipart body could not be parsed ({error}): check its format and Content-Type") from None
        raise
    return parser.upload, parser.fields


async def _flush(parser: _Parser) -> None:
    """Write the file content gathered so far (in a thread: a disk write must not hold the
    event loop)."""
    if parser.upload is not None and parser.pending:
        block, parser.pending = bytes(parser.pending), bytearray()
        await run_in_threadpool(parser.upload.write, block)
