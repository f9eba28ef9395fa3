# The two commands (see README): both set everything up first.
.PHONY: demo test setup bench

demo:
	scripts/setup.sh
	target/release/deltabox demo

test:
	scripts/test.sh

setup:
	scripts/setup.sh

bench:
	scripts/setup.sh
	target/release/deltabox bench runtime
