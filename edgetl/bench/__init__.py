"""edgetl bench: targets (bench/targets/), the timing loop, and the runner."""
