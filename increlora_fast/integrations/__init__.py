"""Integrations on top of the core: the HF Trainer (`trainer`) and peft export (`peft_export`)."""
from .peft_export import export_peft

__all__ = ["export_peft"]
