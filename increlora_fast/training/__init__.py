"""The plain fine-tuning loop behind `increlora-fast finetune`, for IncreLoRA and its peers:
`finetune_run.run_finetune` (one run) and `compare.compare_methods` (methods x seeds)."""
