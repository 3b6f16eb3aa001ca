"""What `increlora-fast gpu-check` runs: the sizes of each part on a GPU (`full_plan`) and in
the dry run on CPU (`dry_run_plan`). The parts themselves are in `parts`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..speed.host_overhead import HostPlan
from ..speed.plans import LayerPlan, ModelPlan

# training steps of each eager and graphed tiny-BERT run of the graphs part
GRAPH_STEPS = 16
# The default fine-tune reaches 0.81-0.82 on CPU (README); a broken GPU path lands near 0.5.
MIN_FULL_ACCURACY = 0.75


@dataclass
class CheckPlan:
    """What each part runs: the layer grid and its host-time point, one model plan per preset,
    the 4-bit model plan, the fine-tune's extra command-line arguments, and the accuracy each
    IncreLoRA fine-tune must reach."""

    kernel_quick: bool
    layer: LayerPlan
    host: HostPlan
    models: List[ModelPlan]
    qlora: ModelPlan
    finetune: List[str] = field(default_factory=list)
    min_accuracy: Optional[float] = None
    # (in, out, tokens) of the adapter's pass over dy against cuBLAS dy W and of the exact score
    # against cuBLAS dy^T x (r_max: the layer's); 384 -> 1536 at 2,048 tokens is the main job's
    # FFN layer and batch, where small launches weigh most
    dy_pass: List[Tuple[int, int, int]] = field(default_factory=list)
    # training steps of each eager and graphed tiny-BERT run of the graphs part
    graph_steps: int = GRAPH_STEPS
    # timed optimizer steps of each way of launching (`speed.optimizer_host`, first model plan)
    optimizer_repeats: int = 50
    # timed penalty calls of each path (`speed.penalty_time`, first model plan)
    penalty_repeats: int = 50


def full_plan() -> CheckPlan:
    """The GPU sizes: about 6.6 to 7 minutes in all on one H200, as the last full run took
    (2026-12-05: 399 s, `bench/records/h200_2026-12-05_gpu_check.json`; each part below with
    that run's seconds):

    - kernels, the quick suite (every variant and dtype, small shapes): 65 s, mostly Triton
      compiling each variant once (later parts reuse the builds);
    - graphs, a tiny BERT trained 16 steps twice in each of three precisions: 22 s, plus
      compiling any Triton variant the suite did not;
    - finetune, four runs (ours eager with each batch padded to the fixed length and to its
      longest input, graphs on, LoRA): 68 s;
    - model, three presets x six methods, 20 steps each: 192 s, half the check, mostly
      torch.compile's first step (about 25-40 s per preset) and each preset's Triton builds;
    - qlora, 2-layer Llama-7B in NF4 (2 GB of random weights written and read back): 17 s;
    - layer, four points x six methods, the host-time point, the dy pass at each `dy_pass`
      point, the optimizer's host time per step and the penalty's time per call on MiniLM-L6
      (its model trained to the budget first, for each of the two): 35 s.
    """
    layer = LayerPlan(shapes=[(768, 3072), (4096, 11008)], tokens=[2048, 16384], r_max=[16],
                      dtypes=["bf16"], phases=["fwd+bwd"], warmup=3, repeats=10)
    host = HostPlan(in_features=768, out_features=3072, tokens=2048, r_max=16, warmup=5,
                    repeats=50)
    common = dict(steps=20, warmup_steps=4, dtypes=["bf16"], r_max=16, init_r=2, target_rank=8)
    models = [ModelPlan(models=["minilm-l6"], batch_size=32, seq_len=64,
                        **dict(common, r_max=8, init_r=1, target_rank=2)),
              ModelPlan(models=["deberta-v3-base"], batch_size=16, seq_len=256, **common),
              ModelPlan(models=["llama-7b-2l"], batch_size=4, seq_len=1024, **common)]
    qlora = ModelPlan(models=["llama-7b-2l"], batch_size=4, seq_len=1024, base_4bit=True,
                      **dict(common, steps=12))
    return CheckPlan(kernel_quick=True, layer=layer, host=host, models=models, qlora=qlora,
                     finetune=[], min_accuracy=MIN_FULL_ACCURACY,
                     dy_pass=[(768, 3072, 16384), (4096, 11008, 16384), (384, 1536, 2048)])


def dry_run_plan() -> CheckPlan:
    """Toy sizes of every part, for CPU (Triton interpreter) in a few minutes."""
    layer = LayerPlan(shapes=[(24, 40)], tokens=[16, 32], r_max=[8], dtypes=["bf16"],
                      phases=["fwd+bwd"], warmup=1, repeats=2, interpreter_point=(16, 24, 16))
    host = HostPlan(in_features=24, out_features=40, tokens=16, r_max=8, warmup=1, repeats=5)
    # target_rank 2 (the main job's): 4 steps hold both tracked and untracked steps of ours.
    common = dict(batch_size=2, seq_len=8, steps=4, warmup_steps=1, dtypes=["bf16"], r_max=8,
                  init_r=1, target_rank=2)
    models = [ModelPlan(models=[name], **common)
              for name in ("tiny-bert", "tiny-deberta", "tiny-llama")]
    qlora = ModelPlan(models=["tiny-llama"], base_4bit=True, **common)
    finetune = ["--max-steps", "4", "--max-train-samples", "64", "--max-eval-samples", "64",
                "--batch-size", "8", "--eval-batch-size", "32", "--max-seq-len", "32"]
    return CheckPlan(kernel_quick=True, layer=layer, host=host, models=models, qlora=qlora,
                     finetune=finetune, dy_pass=[(24, 40, 16)], optimizer_repeats=1,
                     penalty_repeats=1)
