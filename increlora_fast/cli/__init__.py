"""Command-line interface: ``increlora-fast finetune`` and ``increlora-fast bench``."""
