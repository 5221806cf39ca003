"""The worker's engine stage: the scheduler, behind a declared interface, and its batching
strategies, KV cache and prefix cache."""
