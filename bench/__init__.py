"""Benchmarks of the operator on the local control plane: ``PYTHONPATH=hack python -m bench``.

``BENCH_SIZE=small`` shrinks every size; ``--only NAME`` runs one measurement. The table is printed
and, after a run of every measurement, written to ``docs/benchmarks.md``.
"""
