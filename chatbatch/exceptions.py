"""Errors of the chatbatch command line and APIs; all share one base class."""

from __future__ import annotations


class ChatbatchError(Exception):
    """Base class. The message names the problem and the fix, for people."""


class ConfigurationError(ChatbatchError):
    """The command cannot start: bad option, unreadable file, no Redis."""


class RefusedDestination(ConfigurationError):
    """A callback URL whose destination callbacks may not go to (chatbatch/egress.py)."""


class UnresolvedDestination(RefusedDestination):
    """A callback URL whose host does not resolve (now: a worker tries again later)."""


class InputTooLargeError(ConfigurationError):
    """An input file is over a size or line limit."""


class JobNotFoundError(ChatbatchError):
    """No job with this id in Redis."""


class RequestFailedError(ChatbatchError):
    """A single request ended as an error record."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class IdempotencyKeyError(ChatbatchError):
    """A malformed idempotency key."""


class IdempotencyConflictError(IdempotencyKeyError):
    """An idempotency key that names another call's intent: it was first sent with another body."""
