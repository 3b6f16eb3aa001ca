"""The one place that knows every method: `build_method` picks the `MethodRun` of a run.

The dependency points one way: the method modules import the base class from `methods`, and
only this module imports the method modules.
"""
from __future__ import annotations

from torch import nn

from .increlora_method import IncreLoRARun
from .methods import MethodRun
from .peft_methods import AdaLoRARun, LoRARun
from .settings import RunSettings


def build_method(model: nn.Module, settings: RunSettings) -> MethodRun:
    """Wrap a freshly loaded classification model for ``settings.method``."""
    if settings.method == "increlora":
        return IncreLoRARun(model, settings)
    if settings.method in ("lora", "adalora"):
        return (LoRARun if settings.method == "lora" else AdaLoRARun)(model, settings)
    for p in model.parameters():
        p.requires_grad_(True)
    return MethodRun(model, settings)
