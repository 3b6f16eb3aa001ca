"""Speed and memory benchmarks of IncreLoRA against its baselines (``increlora-fast bench``).

Modules: `timing` (median of repeated runs, peak memory), `methods` (layer-level method
factories), `dense_increlora` (the authors' dense layer, re-implemented as a baseline), `layer` and
`model` (the two benchmark levels), `plans` (quick and full shape grids), `records` (JSON/CSV
records), `report` (tables, plot, ``bench/RESULTS.md``) and `targets` (the issue's targets checked
against the records). `memory_probe` counts peak memory per tensor (CUDA allocator, or live
tensor storages on CPU). The memory breakdown behind ``increlora-fast memory``: `memory_model`
(the model from a config, on the meta device or real), `memory_methods` (exact sizes per method,
one training step), `memory_step` (measured and estimated step memory), `memory` (the rows and
the table) and `memory_check` (the breakdown's total against a real loop's peak). The core
library never imports this package.
"""
