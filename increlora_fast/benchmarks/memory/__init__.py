"""The memory breakdown behind ``increlora-fast memory``: `model_spec` (the model from a config,
on the meta device or real), `compared_methods` (exact sizes per method, one training step),
`step` (measured and estimated step memory), `breakdown` (the rows and the table) and `check`
(the breakdown's total against a real loop's peak)."""
