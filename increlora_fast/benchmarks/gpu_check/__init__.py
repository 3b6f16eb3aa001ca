"""The one-shot check of the GPU path behind ``increlora-fast gpu-check``: `parts` (the five
parts, their plans and the runner that writes the report), `markdown` (the report as Markdown,
and its sections in ``bench/RESULTS.md``) and `asset_pack` (the fine-tune's offline assets packed
for ``--assets``)."""
