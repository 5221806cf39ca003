"""A Celery app for Celery's own tools, pointed at the fleet's broker: `celery -A
chatbatch.celery_app inspect active`, `celery -A chatbatch.celery_app flower`
(docs/observability.md).

It has the workers' configuration and no tasks: remote control and events name tasks by their
strings (`chatbatch.chat`, `chatbatch.chunk`, `chatbatch.callback`), so neither torch nor the
worker's code is imported. The `celery` command imports this module by name and cannot pass
settings in, so this is the one module that reads the settings when it is imported.
"""

from __future__ import annotations

from chatbatch.queues import make_celery
from chatbatch.settings import get_settings

app = make_celery(get_settings(), name="chatbatch")
