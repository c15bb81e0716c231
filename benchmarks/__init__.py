"""Benchmarks of failover: overhead, crash and blackhole RTO, failback storm. Run ``python3 benchmarks/run_all.py``."""
