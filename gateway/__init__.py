"""The OpenAI-compatible HTTP API (`chatbatch serve`): an app factory, a router per resource,
pydantic bodies, waits that hold no thread."""

from gateway.app import create_app
from gateway.server import serve

__all__ = ["create_app", "serve"]
