"""Levante's benchmark suite: ``python -m levante.bench`` (or ``scripts/bench``).

Each scenario starts a real ``levante serve`` process on a fresh store in a temporary
directory and real ``levante worker`` processes, all on 127.0.0.1, drives them through
``levante.Client``, and ends every process it started by its PID. Results are printed
as a table (median, min and max over ``--runs``) and optionally written as JSON.

Modules: ``processes`` (child processes and /proc readings), ``stores`` (a fresh store
per run and read-only observers of it), ``workflows`` (generated YAML), ``scenarios``
(what is measured), ``report`` (figures, the table, JSON), ``cli`` (the options).
"""
