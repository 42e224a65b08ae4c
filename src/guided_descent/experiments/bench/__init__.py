"""The pieces of ``guided-descent bench train`` and ``bench suite``, one concern per module.

``workloads`` (the tasks), ``protocol`` (one timed run), ``sweep`` (the defaults and tuned
tracks, resuming), ``results`` (targets, time to target, statistics) and ``claims`` (the
verdicts). The configuration and the entry point live in
:mod:`guided_descent.experiments.bench_train`.
"""
