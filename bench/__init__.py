"""Benchmarks of the similarity index, measured side by side with the tools users would pick instead.

One entry point per study (``python -m bench recall|scaling|distributed|e2e``); each writes a CSV of
raw results, a Markdown report and PNG plots into ``bench/results/<study>/`` and logs a short summary.
Nothing here is imported by ``batch_index`` or ``streaming``.
"""
