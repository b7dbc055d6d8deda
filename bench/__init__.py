"""Benchmark of xent_ext.cross_entropy against F.cross_entropy and its peers.

Run with `python -m bench` (see bench/README.md).  Modules, one job each:
  cases   which shapes, dtypes and modes run on which device
  impls   the implementations compared (a registry: add an entry to compare one more)
  timing  warm-up, adaptive reps, input rotation, copy baseline
  memory  peak memory of one call
  runner  the loop over all cells, with the correctness check before timing
  report  derived numbers, the printed table, the JSON file
  plot    the PNG next to the JSON
"""
