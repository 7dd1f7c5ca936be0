"""``medfast bench``: every benchmark suite (each op family against its peers, and the training
steps) in one run, summarized as medfast/peer speed ratios and peak memory in a JSON file, a
Markdown table and a PNG chart named by host, device and date.

The suites are the scripts of the repository's ``benchmarks/`` folder (shipped inside the wheel as
``medfast/benchmarks``); each runs in its own process, so one that fails or whose peer library is
not installed is reported (``failed`` / ``skipped``) without stopping the others.
"""

from medfast.bench.runner import SUITES, Row, Suite, main, run_suites

__all__ = ["SUITES", "Row", "Suite", "main", "run_suites"]
