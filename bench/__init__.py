"""pladis.bench: benchmarks, apart from the tests. Results are JSON files in ``bench/results/``;
``docs/PERFORMANCE.md`` is generated from them (``python -m pladis.bench.report``)."""
