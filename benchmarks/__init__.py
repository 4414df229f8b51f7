"""ringlab's benchmark scripts. Run all with ``python -m benchmarks.run``; each also runs alone."""
