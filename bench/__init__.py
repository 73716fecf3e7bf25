"""Benchmarks of syncctl: figures and ratios measured side by side in one run.

Run them with ``nox -s bench`` (or ``python -m bench.run`` in an environment
where syncctl and the peers are installed). They are never part of the test
suite: they print tables and compare ratios against targets, nothing more.
"""
