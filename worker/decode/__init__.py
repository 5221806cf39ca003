"""The worker's decode stage: the chat format, sampling, grammar masks, stop strings and
detokenizing; it knows the tokenizer and tensors, never the engine, the models or the service."""
