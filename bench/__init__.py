"""The repository's GPU checks and benchmarks (``python bench/<script>.py``) and their measuring harness
(``bench.harness``). Not part of the installed package."""
