"""A literal reference of IncreLoRA as the authors' code runs it, written from
``shared/INCRELORA.md`` alone (not from this library's layer, controller or optimizer).

Each adapted linear holds its components as lists of ``nn.Parameter`` that grow by appending:
one (1, in) row of A, one (1,) lambda and one (out, 1) column of B per component. The first
``n_active`` components are active, the rest are the reserve. ΔW is materialised in every
forward and its gradient taken by autograd; the optimizer is ``torch.optim.AdamW`` with a new
parameter group, with its own schedule, for every group of parameters that starts training.

Where this library departs from the authors' code on purpose and says so, the reference
follows the documented departure:

1. Round size: a round grows at most ``min(top_h, ceil(remaining / incre_rank_num))`` modules,
   ties in module order, and the last one gains only what the budget has left (the authors'
   ``min(top_h, T - total)`` overshoots when ``incre_rank_num > 1``): ``IncreLoRAConfig``
   (``top_h``, ``incre_rank_num``); spec section 4, "Known defects".
2. Restart warmup on fixed shapes: a lambda's schedule starts at the step it is activated (its
   parameter group is added then, with fresh Adam moments); A and B of a reserve start when the
   reserve is allocated, or, without advance learning, when it is activated:
   the module docstring of ``increlora_fast/optimizer.py`` and
   ``IncreLoRAAdamW._restart_fresh_slots``; spec "Our design". One step earlier than the
   authors' code: their scheduler (``Multi_LambdaLR.check_new_params``) starts a group added at
   a round at schedule step 0, so its first optimizer step runs at learning rate 0 (Adam still
   counts it and takes its moments) and the next at 1/W; ours runs the first at 1/W, with Adam's
   step count 1 (W = ``warmup_steps``; a step of 1/W of the warmup, negligible at the GLUE
   scripts' warmups of 100 steps and more).
3. A component changed at an allocation step takes no optimizer step at that step (the module
   docstring of ``increlora_fast/optimizer.py``). Here that is AdamW's own rule: a parameter
   without a gradient is skipped, and one that joins at a round had none.
4. Fresh reserve values: N(0, 0.02) as the spec says, drawn from the ``generator`` given here in
   the order of the library's controller (``IncreLoRAConfig.seed``: its own generator):
   per grown module, its A rows (n, in) then its B columns (out, n), in float32. This only makes
   the two runs draw the same values.
5. Scores are taken on every step of the allocation phase; the library scores only a window
   before each round unless ``score_window >= incre_interval``
   (``IncreLoRAConfig.score_window``; README, "The importance score ..."), which the comparison
   sets.
6. A module holds at most ``r_max`` slots (``IncreLoRAConfig.r_max``: a module with no reserve
   left is not ranked). The reference has no capacity; the comparison keeps ``r_max`` above any
   rank a module can reach.
7. With gradient accumulation the library's default score sums the scores of the step's
   backward passes, Σ_k Σ|ΔW ⊙ G_k|, not the spec's Σ|ΔW ⊙ Σ_k G_k|
   (``IncreLoRAConfig.exact_step_score``; README, "The importance score ...";
   ``docs/distributed.md``). The reference always scores the whole step, as the spec says
   (each micro-batch materialises ΔW, their ∂L/∂ΔW are summed:
   `ReferenceLinear.accumulate_grad`); the comparison sets ``exact_step_score=True``. (A ΔW gradient retained from the last forward alone would score
   the last micro-batch only.)
8. Under a plain Hugging Face ``Trainer`` with ``IncreLoRACallback``, the penalty is not in the
   loss: its gradient is added once per step after clipping (the module docstring of
   ``integrations/trainer.py``, ``IncreLoRACallback.on_pre_optimizer_step``); the comparison
   of that path does the same with the reference's penalty.

At the budget (spec 2) only the reserve lambdas become 0: the reserve A and B stay trainable
and stay in the penalty (spec 6, "all components"), as in the authors' code and in the library
(``IncreLoRALinear.retire_reserve``).

Read as the library reads it: "before the first optimizer step every module gets its reserve"
(spec 2) is taken as "before the first forward" (``IncreLoRALinear.__init__``), so step 0's loss,
penalty and score include the reserve, and its A and B take step 0's update. The spec says
nothing of micro-batches: the penalty counts once per optimizer step, each of the ``n`` passes
adding ``penalty / n`` (``docs/distributed.md``;
``IncreLoRATrainer.compute_loss``), and the task
loss is what the training loop backpropagates (divided by ``n`` in a plain loop; the Trainer
leaves the mean loss of a model that accepts loss kwargs undivided, taking it for one
normalised over the whole step). ``IncreLoRATrainer`` ends every schedule at its number of
training steps when ``config.total_step`` is None (``IncreLoRATrainer.create_scheduler``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

INIT_STD = 0.02


class ReferenceLinear(nn.Module):
    """A frozen linear plus an adapter whose components are appended one by one (spec 1, 2).

    Output: ``base(x) + x ΔWᵀ`` with ``ΔW = B diag(λ) A · alpha / n_active`` over active and
    reserve components (a reserve λ is fixed at ``reserve_lambda``, or 0 without advance
    learning, and is not trainable).
    """

    def __init__(self, base: nn.Linear, init_r: int, reserve_r: int, alpha: float,
                 reserve_lambda: float, advance_learning: bool) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.alpha = alpha
        self.reserve_lambda = reserve_lambda if advance_learning else 0.0
        self.advance_learning = advance_learning
        self.lora_A = nn.ParameterList()
        self.lora_E = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.n_active = 0
        self.delta_w: Optional[torch.Tensor] = None  # ΔW of the last forward
        self.step_grad: Optional[torch.Tensor] = None  # ∂L/∂ΔW summed over the step's passes
        self._append(init_r, lam=0.0, trainable_ab=True, trainable_lam=True)
        self.n_active = init_r
        self.append_reserve(reserve_r)

    @property
    def n_reserve(self) -> int:
        return len(self.lora_E) - self.n_active

    def _append(self, n: int, lam: float, trainable_ab: bool, trainable_lam: bool,
                generator: Optional[torch.Generator] = None) -> List[nn.Parameter]:
        """Append ``n`` components (A, B ~ N(0, 0.02)); returns their new parameters."""
        w = self.base.weight
        # transformers' Conv1D (GPT-2) stores its weight as (in, out)
        out_f, in_f = w.shape[::-1] if type(self.base).__name__ == "Conv1D" else w.shape
        a = torch.randn(n, in_f, generator=generator, dtype=torch.float32).to(w.dtype) * INIT_STD
        b = torch.randn(out_f, n, generator=generator, dtype=torch.float32).to(w.dtype) * INIT_STD
        new: List[nn.Parameter] = []
        for i in range(n):
            pa = nn.Parameter(a[i:i + 1].clone(), requires_grad=trainable_ab)
            pb = nn.Parameter(b[:, i:i + 1].clone(), requires_grad=trainable_ab)
            pe = nn.Parameter(torch.full((1,), lam, dtype=w.dtype), requires_grad=trainable_lam)
            self.lora_A.append(pa)
            self.lora_B.append(pb)
            self.lora_E.append(pe)
            new += [pa, pb, pe]
        return new

    def append_reserve(self, n: int, generator: Optional[torch.Generator] = None
                       ) -> List[nn.Parameter]:
        """Append ``n`` reserve components; returns their A and B (what trains from now with
        advance learning)."""
        new = self._append(n, self.reserve_lambda, self.advance_learning, False, generator)
        return [p for p in new if p.dim() == 2]

    def activate(self, n: int) -> List[nn.Parameter]:
        """Make the first ``n`` reserve components active (their λ, still the reserve value,
        becomes trainable; their A and B are kept). Returns the parameters that start training
        now: the λs, and without advance learning also the A and B."""
        idx = range(self.n_active, self.n_active + n)
        self.n_active += n
        started = []
        for i in idx:
            self.lora_E[i].requires_grad_(True)
            started.append(self.lora_E[i])
            if not self.advance_learning:
                for p in (self.lora_A[i], self.lora_B[i]):
                    p.requires_grad_(True)
                    started.append(p)
        return started

    @torch.no_grad()
    def retire(self) -> None:
        """Budget reached: reserve λ set to 0 (spec 2); nothing else changes."""
        for i in range(self.n_active, len(self.lora_E)):
            self.lora_E[i].zero_()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B diag(λ) A · alpha / n_active over every component (spec 1 and 3)."""
        a = torch.cat(list(self.lora_A))
        b = torch.cat(list(self.lora_B), dim=1)
        lam = torch.cat(list(self.lora_E))
        return (b * lam) @ a * (self.alpha / self.n_active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.delta_w = self.delta_weight()
        if self.delta_w.requires_grad:
            self.delta_w.register_hook(self.accumulate_grad)
        return self.base(x) + x @ self.delta_w.t()

    def accumulate_grad(self, grad: torch.Tensor) -> None:
        """Add one backward pass's ∂L/∂ΔW into the step's (every micro-batch materialises its
        own ΔW; they are equal within a step, as no update comes between them)."""
        self.step_grad = grad.clone() if self.step_grad is None else self.step_grad + grad

    def score(self) -> float:
        """Σ|ΔW ⊙ G| / sqrt(out · in) with G = ∂L/∂ΔW of the whole optimizer step, summed over
        its micro-batches (spec 3)."""
        g = self.step_grad
        return float((self.delta_w.detach() * g).abs().sum() / math.sqrt(g.numel()))

    def orth_penalty(self) -> torch.Tensor:
        """‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F over every component, active and reserve (spec 6)."""
        a = torch.cat(list(self.lora_A))
        b = torch.cat(list(self.lora_B), dim=1)
        eye = torch.eye(len(self.lora_E), dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.t() - eye) + torch.linalg.matrix_norm(b.t() @ b - eye)


def schedule(step: int, start: int, warmup_steps: int, total_step: Optional[int]) -> float:
    """Learning-rate multiplier at ``step`` of a group added at ``start`` (spec 5): linear
    warmup from 0 over ``warmup_steps``, then linear decay to 0 at ``total_step``."""
    since = step - start
    if since < warmup_steps:
        return since / warmup_steps
    if total_step is None:
        return 1.0
    return max(0.0, (total_step - step) / (total_step - start - warmup_steps))


class AuthorsReference:
    """The training-side machinery of the method around a model whose ``targets`` (module
    names, in the order the comparison ranks them) are replaced by `ReferenceLinear`.

    Per optimizer step ``t`` (0-based): for each of its ``n`` micro-batches (one without
    accumulation) forward, ``loss = task + regularization_loss() / n`` (the task loss as the
    training loop weighs it) and backward; then (clipping), ``update_and_allocate(t)``,
    ``optimizer_step(t)``, ``zero_grad()``.
    """

    def __init__(self, model: nn.Module, targets: Sequence[str], *, init_r: int,
                 target_total_rank: int, incre_rank_num: int, top_h: int, init_warmup: int,
                 incre_interval: int, lora_alpha: float, reserve_lambda: float,
                 advance_learning: bool, beta1: float, beta2: float, orth_reg_weight: float,
                 warmup_steps: int, total_step: Optional[int], lr: float, weight_decay: float,
                 betas: Tuple[float, float], eps: float, generator: torch.Generator) -> None:
        self.model = model
        self.names = list(targets)
        self.layers: List[ReferenceLinear] = []
        for name in self.names:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            layer = ReferenceLinear(getattr(owner, leaf), init_r, incre_rank_num, lora_alpha,
                                    reserve_lambda, advance_learning)
            setattr(owner, leaf, layer)
            self.layers.append(layer)
        self.target = target_total_rank
        self.incre_rank_num, self.top_h = incre_rank_num, top_h
        self.init_warmup, self.incre_interval = init_warmup, incre_interval
        self.beta1, self.beta2 = beta1, beta2
        self.orth_reg_weight = orth_reg_weight
        self.warmup_steps, self.total_step, self.lr = warmup_steps, total_step, lr
        self.generator = generator
        self.ipt = [0.0] * len(self.layers)
        self.unc = [0.0] * len(self.layers)
        self.budget_reached = False
        self.allocation_log: List[Dict[str, object]] = []
        # the authors' trainer (an older transformers Trainer.create_optimizer): no weight
        # decay on parameters of an nn.LayerNorm or named with "bias"
        spared = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
                  for p in m.parameters(recurse=False)}
        spared |= {id(p) for n, p in model.named_parameters() if "bias" in n}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in spared], "start": 0},
                  {"params": [p for p in trainable if id(p) in spared], "start": 0,
                   "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr,
                                           betas=betas, eps=eps, weight_decay=weight_decay)

    def total_rank(self) -> int:
        return sum(layer.n_active for layer in self.layers)

    def rank_pattern(self) -> Dict[str, int]:
        return {n: layer.n_active for n, layer in zip(self.names, self.layers)}

    def scores(self) -> Tuple[List[float], List[float]]:
        """The score EMAs (ipt, unc), one entry per module."""
        return list(self.ipt), list(self.unc)

    def regularization_loss(self) -> torch.Tensor:
        """orth_reg_weight · Σ_m R_m / (2 · modules) (spec 6)."""
        total = sum(layer.orth_penalty() for layer in self.layers)
        return self.orth_reg_weight * total / (2 * len(self.layers))

    def _add_group(self, params: List[nn.Parameter], step: int) -> None:
        """A new parameter group with its own schedule from ``step`` (spec 5)."""
        if params:
            self.optimizer.add_param_group({"params": params, "start": step})

    def update_and_allocate(self, step: int) -> None:
        """Scores into the EMAs (spec 3), then an allocation round when one is due (spec 4)."""
        if self.budget_reached:
            return
        for i, layer in enumerate(self.layers):
            s = layer.score()
            self.ipt[i] = self.beta1 * self.ipt[i] + (1 - self.beta1) * s
            self.unc[i] = self.beta2 * self.unc[i] + (1 - self.beta2) * abs(s - self.ipt[i])
        if step > self.init_warmup and step % self.incre_interval == 0:
            self._allocate(step)

    def _allocate(self, step: int) -> None:
        remaining = self.target - self.total_rank()
        score = [i * u for i, u in zip(self.ipt, self.unc)]
        # Highest first, ties in module order; never more than k modules (departure 1).
        k = min(self.top_h, math.ceil(remaining / self.incre_rank_num))
        chosen = sorted(range(len(self.layers)), key=lambda i: -score[i])[:k]
        for i in chosen:
            layer = self.layers[i]
            gain = min(self.incre_rank_num, remaining)
            self._add_group(layer.activate(gain), step)
            fresh = layer.append_reserve(self.incre_rank_num, self.generator)
            if layer.advance_learning:
                self._add_group(fresh, step)
            remaining -= gain
            self.allocation_log.append({"step": step, "module": self.names[i],
                                        "new_rank": layer.n_active})
        if remaining <= 0:
            for layer in self.layers:
                layer.retire()
            self.budget_reached = True

    def optimizer_step(self, step: int) -> None:
        """Every group at its own point of the schedule, then one AdamW step."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * schedule(step, group["start"], self.warmup_steps,
                                             self.total_step)
        self.optimizer.step()

    def zero_grad(self) -> None:
        """Gradients cleared, the step's ∂L/∂ΔW with them."""
        self.optimizer.zero_grad(set_to_none=True)
        for layer in self.layers:
            layer.step_grad = None

