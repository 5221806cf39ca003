"""The worker: owns the model, the batching engine and the result sinks."""
