.PHONY: demo test

# The main job end to end on the default model, with a local redis-server and the sample JSONL.
demo:
	scripts/demo.sh

# Everything the tests need, then the tests.
test:
	scripts/test.sh
