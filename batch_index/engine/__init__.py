"""The index engine: metrics, reference transform, trees, graph walk, re-ranking, exact search; plain numpy
and scikit-learn with numba kernels, never pyspark."""
