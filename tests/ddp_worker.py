"""Data-parallel worker for tests/test_ddp.py, and the single-process reference it is compared to.

Launched as one of 2 CPU processes (gloo), either by
``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py torchrun OUT``
(DDP with ``no_sync`` micro-batches, with the exact-step score and with the default fused
per-pass score; FSDP2 and FSDP1 sharding the frozen base; DDP with per-rank seeds; FSDP1
left to shard the adapter) or by
``accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py accelerate OUT``
(`Accelerator.prepare` + ``accumulate``), or by torchrun with ``trainer OUT`` (`IncreLoRATrainer`,
which sets up the process group and shards the data itself; `run_trainer_torchrun`). In every
run each rank takes its half of the same global batch in 2 micro-batches and trains;
``OUT/rank<r>.pt`` maps run name to allocation log, rank pattern, smoothed scores and model
state.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, IncreLoRAController, create_optimizer, inject_increlora

from method_helpers import ParallelBranches

STEPS = 20
GLOBAL_BATCH = 16
MICRO = 2
D_IN, D_HID, CLASSES = 6, 8, 3


class Net(nn.Module):
    """Adapted parallel branches of unequal weight, then a trained classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ParallelBranches(4, d_in=D_IN, d_out=D_HID, weights=[1.0, 0.3, 2.0, 0.7])
        self.head = nn.Linear(D_HID, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def build(exact_step_score: Optional[bool] = True) -> Tuple[Net, IncreLoRAConfig]:
    """``exact_step_score=None`` is the default (the fused per-pass score)."""
    torch.manual_seed(0)
    config = IncreLoRAConfig(target_modules=r"body\.branches\.\d+", r_max=5, init_r=1,
                             target_rank=3, incre_rank_num=1, init_warmup=2, incre_interval=2,
                             top_h=1, warmup_steps=2, total_step=STEPS, modules_to_save=["head"],
                             exact_step_score=exact_step_score)
    return inject_increlora(Net(), config), config


def global_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,),
                                                                       generator=g)


def shard(step: int, rank: int, world: int, micro: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's equal slice of the global batch, cut into ``micro`` equal micro-batches."""
    x, y = global_batch(step)
    per = GLOBAL_BATCH // world
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    return list(zip(x.chunk(micro), y.chunk(micro)))


def loss_fn(model: nn.Module, controller: IncreLoRAController, x: torch.Tensor,
            y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y) + controller.regularization_loss()


def result(model: Net, controller: IncreLoRAController) -> Dict[str, object]:
    return {"allocation_log": controller.allocation_log, "rank_pattern": controller.rank_pattern(),
            "ipt": controller.ipt, "unc": controller.unc,
            "exact_step_score": controller.exact_step_score,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def run_single_process(micro: int = 1) -> Dict[str, object]:
    """The reference: one process, the whole global batch per step, in ``micro`` equal
    micro-batches (1: one pass) with the default fused per-pass score. With ``micro`` = ranks x
    MICRO its per-pass scores are those of a data-parallel run's micro-batches, averaged over
    ranks."""
    model, config = build(exact_step_score=None)
    optimizer = create_optimizer(model, config, lr=2e-2, weight_decay=0.01)
    controller = IncreLoRAController(model, config)
    for step in range(STEPS):
        for x, y in shard(step, 0, 1, micro):
            (loss_fn(model, controller, x, y) / micro).backward()
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()
    return result(model, controller)


def _steps(rank: int, world: int) -> Iterator[Tuple[int, List[Tuple[torch.Tensor, torch.Tensor]]]]:
    for step in range(STEPS):
        yield step, shard(step, rank, world, MICRO)


def _ddp(rank: int, world: int, rank_seeds: bool = False,
         exact_step_score: Optional[bool] = True) -> Dict[str, object]:
    """DDP with ``no_sync`` on all micro-batches but the last. ``rank_seeds``: every rank reseeds
    its global RNG differently after the model is built (as per-rank seeding does)."""
    from torch.nn.parallel import DistributedDataParallel

    model, config = build(exact_step_score)
    ddp = DistributedDataParallel(model)
    optimizer = create_optimizer(model, config, lr=2e-2, weight_decay=0.01)
    controller = IncreLoRAController(model, config)
    if rank_seeds:
        torch.manual_seed(100 + rank)
    for step, micro in _steps(rank, world):
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                (loss_fn(ddp, controller, x, y) / len(micro)).backward()
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()
    return result(model, controller)


def _train_averaging_by_hand(forward: nn.Module, model: Net, config: IncreLoRAConfig,
                             trainable: List[torch.Tensor], rank: int,
                             world: int) -> IncreLoRAController:
    """Train ``model`` through ``forward`` (it or its FSDP wrapper) over this rank's share of
    the steps, the gradients of the unsharded ``trainable`` tensors averaged over the ranks by
    hand; the controller, for `result`."""
    import torch.distributed as dist

    optimizer = create_optimizer(model, config, lr=2e-2, weight_decay=0.01)
    controller = IncreLoRAController(model, config)
    for step, micro in _steps(rank, world):
        for x, y in micro:
            (loss_fn(forward, controller, x, y) / len(micro)).backward()
        for p in trainable:  # in model order, so every rank issues the same collectives
            dist.all_reduce(p.grad)
            p.grad /= world
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()
    return controller


def _fsdp2(rank: int, world: int) -> Dict[str, object]:
    """FSDP2 shards the frozen base weights; the trainable tensors (adapter slots, head) are left
    out of sharding (``ignored_params``), kept whole on every rank and averaged by hand."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, config = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for branch in model.body.branches:
        fully_shard(branch, ignored_params=set(trainable))
    fully_shard(model, ignored_params=set(trainable))
    controller = _train_averaging_by_hand(model, model, config, trainable, rank, world)
    out = result(model, controller)
    out["sharded"] = sorted(k for k, v in model.state_dict().items() if isinstance(v, DTensor))
    out["state"] = {k: v.full_tensor() if isinstance(v, DTensor) else v
                    for k, v in out["state"].items()}
    return out


def _fsdp1_wrap(model: Net, **kwargs: object) -> nn.Module:
    """FSDP1 on CPU, one unit per adapted module (``base_layer`` and adapter together) and the
    root."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from increlora_fast.layer import IncreLoRALinear

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True,
                                    auto_wrap_policy=ModuleWrapPolicy({IncreLoRALinear}),
                                    **kwargs)


def _fsdp1(rank: int, world: int, out_dir: str) -> Dict[str, object]:
    """FSDP1 shards the frozen base weights; the trainable tensors are left out of sharding
    (``ignored_states``), kept whole on every rank and averaged by hand, as for FSDP2. Rank 0
    then saves the adapter with its training state into ``out_dir/fsdp1_adapter``."""
    from increlora_fast import save_adapter

    model, config = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = _fsdp1_wrap(model, ignored_states=trainable)
    controller = _train_averaging_by_hand(wrapped, model, config, trainable, rank, world)
    # FSDP1 flattened these into its FlatParameters; outside the forward pass each is this
    # rank's 1-D piece of a shard
    sharded = sorted(n for n, p in model.named_parameters(remove_duplicate=False)
                     if getattr(p, "_fsdp_flattened", False))
    if rank == 0:
        save_adapter(model, os.path.join(out_dir, "fsdp1_adapter"), training_state=True)
    out = result(model, controller)  # FSDP1's full state dict: gathered, under the model's names
    out["sharded"] = sharded
    return out


def _fsdp1_sharded_adapter() -> Dict[str, object]:
    """FSDP1 left to shard the adapter tensors too: the one-line errors of
    `IncreLoRAController` and `create_optimizer` (empty when one was not raised)."""
    model, config = build()
    _fsdp1_wrap(model)
    errors = {}
    for name, make in (("controller", lambda: IncreLoRAController(model, config)),
                       ("optimizer", lambda: create_optimizer(model, config, lr=2e-2))):
        try:
            make()
            errors[name] = ""
        except ValueError as error:
            errors[name] = str(error)
    return {"errors": errors}


def _fsdp1_default_save(rank: int, out_dir: str) -> Dict[str, object]:
    """FSDP1's default ``use_orig_params=False`` sharding the base linears (units of their own),
    the trainable tensors left whole (``ignored_states``); after a pass rank 0 saves the adapter
    into ``out_dir/fsdp1_default_adapter``: its error ("" when none) and the base fingerprint."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from increlora_fast import save_adapter
    from increlora_fast.persistence import base_fingerprint

    model, config = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                       auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                                       ignored_states=trainable)
    wrapped(global_batch(0)[0]).sum().backward()  # the base's unsharded storage freed after
    error, modules = "", {}
    if rank == 0:
        try:
            modules = base_fingerprint(model)["modules"]
            save_adapter(model, os.path.join(out_dir, "fsdp1_default_adapter"))
        except RuntimeError as err:
            error = str(err)
    return {"error": error, "modules": modules}


def run_torchrun(out_dir: str) -> Dict[str, Dict[str, object]]:
    """DDP (exact-step score, and the default), FSDP2 (when this torch has ``fully_shard``),
    DDP with per-rank seeds, and (when this torch has ``FullyShardedDataParallel``) FSDP1
    sharding the base (its adapter saved into ``out_dir``) and FSDP1 left to shard the
    adapter."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    runs = {"ddp": _ddp(rank, world), "ddp_rank_seeds": _ddp(rank, world, rank_seeds=True),
            "ddp_default": _ddp(rank, world, exact_step_score=None)}
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pass
    else:
        runs["fsdp2"] = _fsdp2(rank, world)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
    except ImportError:
        pass
    else:
        runs["fsdp1"] = _fsdp1(rank, world, out_dir)
        runs["fsdp1_sharded_adapter"] = _fsdp1_sharded_adapter()
        runs["fsdp1_default_save"] = _fsdp1_default_save(rank, out_dir)
    return runs


def run_accelerate() -> Dict[str, Dict[str, object]]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=MICRO)
    rank, world = accelerator.process_index, accelerator.num_processes
    model, config = build()
    optimizer = create_optimizer(model, config, lr=2e-2, weight_decay=0.01)
    controller = IncreLoRAController(model, config)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    for step, micro in _steps(rank, world):
        for x, y in micro:
            with accelerator.accumulate(wrapped):
                accelerator.backward(loss_fn(wrapped, controller, x, y))
                if accelerator.sync_gradients:
                    controller.step(step)
                optimizer.step()
                optimizer.zero_grad()
    return {"accelerate": result(accelerator.unwrap_model(wrapped), controller)}


TRAINER_STEPS = 12
TRAINER_MICRO_BATCH = 4  # rows per micro-batch; a global batch is 4 of them (16 rows)
TRAINER_SAVE_STEPS = 6


def run_trainer(output_dir: str, micro_batches: int, micro_batch: int = TRAINER_MICRO_BATCH,
                exact_step_score: Optional[bool] = None,
                accepts_loss_kwargs: Optional[bool] = None,
                resume_from_checkpoint: Optional[str] = None) -> Dict[str, object]:
    """`IncreLoRATrainer` on the tests' tiny BERT (tests/trainer_helpers.py) for
    ``TRAINER_STEPS`` optimizer steps of ``micro_batches`` accumulated micro-batches of
    ``micro_batch`` rows per process, a checkpoint every ``TRAINER_SAVE_STEPS`` steps and the
    final model saved into ``output_dir/final``. Under torchrun every process calls it with the
    same arguments. ``accepts_loss_kwargs``: set on the model when not None (False: the README's
    advice for BERT's classification head). Adds ``controller_saves``: how many times this
    process wrote a controller file."""
    from transformers import TrainingArguments

    from increlora_fast.integrations import trainer as trainer_module
    from trainer_helpers import TinyTask, tiny_increlora_bert

    class Recorded(TinyTask):
        """Records the rows this process reads, in order."""

        def __getitem__(self, i: int) -> dict:
            rows.append(int(i))
            return super().__getitem__(i)

    rows: List[int] = []
    model, _ = tiny_increlora_bert(warmup_steps=2, exact_step_score=exact_step_score)
    # no dropout: the Trainer seeds every rank alike, so the ranks draw the same masks, not
    # those one process draws over the whole batch
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    args = TrainingArguments(output_dir=output_dir, max_steps=TRAINER_STEPS,
                             per_device_train_batch_size=micro_batch,
                             gradient_accumulation_steps=micro_batches, learning_rate=1e-2,
                             save_steps=TRAINER_SAVE_STEPS, logging_steps=100, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, warmup_steps=2)
    trainer = trainer_module.IncreLoRATrainer(model=model, args=args, train_dataset=Recorded())
    saves: List[str] = []
    save_controller = trainer_module.save_controller

    def counted(controller: IncreLoRAController, directory: str) -> None:
        saves.append(directory)
        save_controller(controller, directory)
    trainer_module.save_controller = counted
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        trainer.save_model(os.path.join(output_dir, "final"))
    finally:
        trainer_module.save_controller = save_controller
    out = result(model, trainer.increlora_controller)
    out["controller_saves"], out["rows"] = len(saves), rows
    return out


def run_trainer_torchrun(out_dir: str) -> Dict[str, Dict[str, object]]:
    """`IncreLoRATrainer` on 2 processes, each taking 2 micro-batches of 4 rows per step (the
    Trainer sets up the process group and shards the data): the default score with the model's
    own ``accepts_loss_kwargs``, and the exact-step score with ``accepts_loss_kwargs=False``;
    then "trainer_resumed": the first run again, resumed from its mid-run checkpoint (written by
    rank 0 before the steps after it, which every rank took together)."""
    first = os.path.join(out_dir, "trainer")
    runs = {"trainer": run_trainer(first, micro_batches=2),
            "trainer_exact": run_trainer(os.path.join(out_dir, "trainer_exact"), micro_batches=2,
                                         exact_step_score=True, accepts_loss_kwargs=False)}
    runs["trainer_resumed"] = run_trainer(
        os.path.join(out_dir, "trainer_resumed"), micro_batches=2,
        resume_from_checkpoint=os.path.join(first, f"checkpoint-{TRAINER_SAVE_STEPS}"))
    return runs


def main(argv: List[str]) -> None:
    modes = {"torchrun": lambda: run_torchrun(argv[1]), "accelerate": run_accelerate,
             "trainer": lambda: run_trainer_torchrun(argv[1])}
    if len(argv) != 2 or argv[0] not in modes:
        raise SystemExit("usage: ddp_worker.py {torchrun|accelerate|trainer} OUT_DIR")
    torch.set_num_threads(1)
    out = modes[argv[0]]()
    rank = int(os.environ["RANK"])
    for run in out.values():
        run["world_size"] = int(os.environ["WORLD_SIZE"])
    torch.save(out, os.path.join(argv[1], f"rank{rank}.pt"))
    _exit_after_every_rank()


def _exit_after_every_rank() -> None:
    """Wait until every rank has written its results, then leave without tearing the gloo
    process group down: its teardown, by `destroy_process_group` or by the interpreter's exit,
    at times aborted a rank on a loaded machine ("terminate called without an active
    exception", SIGABRT) after the rank's work was done, failing the launch."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
