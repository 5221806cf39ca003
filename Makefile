.PHONY: demo lock test

# The main job end to end on the default model, with a local redis-server and the sample JSONL.
demo:
	scripts/demo.sh

# Everything the tests need, then the tests.
test:
	scripts/test.sh

# Resolve the test environments afresh (requirements/test.txt, requirements/clients.txt) and
# install them; commit the two files.
lock:
	scripts/lock.sh
