"""The rollout benchmark's parts; the command line is :mod:`tests.bench.bench_rollout`."""
