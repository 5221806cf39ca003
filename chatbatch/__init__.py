"""chatbatch: asynchronous batch inference for OpenAI-format chat requests.

This package holds what the producer and the worker share (settings, Redis keys, the job store,
queue names) and the command line. It never imports torch or mlflow at module level.
"""

__version__ = "0.1.0"
