"""The producer: validates requests and JSONL jobs and enqueues them for the workers.

It knows Redis and Celery task names, never torch or mlflow.
"""

from producer.client import Client
from producer.handles import JobHandle, RequestHandle

__all__ = ["Client", "JobHandle", "RequestHandle"]
