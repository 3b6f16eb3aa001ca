"""Speed benchmarks behind ``increlora-fast bench``: `plans` (quick and full grids), `timing`
(median of repeated runs, interleaved, with peak memory), `layer_methods` (the layer-level
methods) and `dense_increlora` (the authors' dense layer as a baseline), `layer_level` and
`model_level` (the two benchmark levels; `model_presets`: the models the second trains,
`quantized_base`: a preset's base in 4-bit NF4), `host_overhead` (host time per layer call with
the Triton launches stubbed), `tables` (records as table rows) and `targets` (the issues' speed
and memory targets checked against records)."""
