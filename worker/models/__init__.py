"""The worker's models stage: resolving and loading MLflow chat models, building the offline
ones, choosing their dtype, and the runners that turn a loaded model into batched decodes."""
