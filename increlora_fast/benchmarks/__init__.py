"""Benchmarks of IncreLoRA against its baselines, in three products: `speed` (layer- and
model-level timings behind ``increlora-fast bench``), `memory` (the memory breakdown behind
``increlora-fast memory``) and `gpu_check` (the one-shot check of the GPU path,
``increlora-fast gpu-check``).

Shared by them: `records` (benchmark records as JSON/CSV, with the environment they were measured
in; a gpu-check report's records), `memory_probe` (peak memory per tensor: the CUDA allocator, or
live tensor storages on CPU) and `report` (the console summary, the plot and ``bench/RESULTS.md``
from bench records and gpu-check reports). The core library never imports this package.
"""
