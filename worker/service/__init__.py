"""The worker's service stage: the process entry (main), its Celery app and tasks (single
requests, chunks of jobs, callbacks), the stream publisher, the recovery sweep, MLflow tracking,
metrics and the state a process shares with its tasks. It reaches the engine through its
declared interface (worker/engine/interface.py)."""
