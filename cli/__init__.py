"""The `chatbatch` command line: it sits on top of the producer, the worker and the gateway,
and nothing below imports it."""
