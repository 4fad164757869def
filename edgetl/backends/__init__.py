"""One module per runtime: load a model file with threads, precision and device; run a numpy batch;
say what precision it really runs in and whether its batch is fixed. The torch-free runtime, the
export parity gate, quantize and bench all load models through here, so a setting (a thread count,
a precision hint) means the same thing everywhere."""
