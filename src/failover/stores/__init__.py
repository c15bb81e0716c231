"""One module per store: connect, probe, classify errors, route operations."""
