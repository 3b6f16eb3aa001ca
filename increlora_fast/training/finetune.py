"""One fine-tuning run end to end: data, model, method, loop, evaluation and output files."""
from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ..data import TaskData, load_files, load_task, locate_asset
from ..data.assets import PACKAGED_MODELS
from .batches import Batches
from .checkpoint import load_checkpoint, read_checkpoint_settings, save_checkpoint
from .device import Placement, peak_memory, reset_peak_memory, tokens_per_second
from .loop import LoopState, evaluate, train_loop
from .methods import MethodRun, build_method
from .settings import RunSettings, resolve

METRICS_FILE = "metrics.json"
HEATMAP_FILE = "rank_heatmap.png"
RANK_OVER_TIME_FILE = "rank_over_time.png"
ALLOCATION_LOG_FILE = "allocation_log.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"


def load_data(s: RunSettings) -> TaskData:
    """The task's examples (a packaged task, GLUE or the user's files), subset if asked."""
    if s.train_file:
        data = load_files(s.train_file, s.eval_file, s.text_column, s.text_pair_column,
                          s.label_column)
    elif s.eval_file:
        raise ValueError("--eval-file needs --train-file")
    else:
        data = load_task(s.task)
    return data.subset(s.max_train_samples, s.max_eval_samples)


def model_path(name: str) -> str:
    """A packaged model name (e.g. ``all-MiniLM-L6-v2``) becomes its cached folder; any other
    name is passed to transformers (a local folder or a hub id)."""
    return str(locate_asset(name)) if name in PACKAGED_MODELS and not Path(name).exists() else name


def load_model(s: RunSettings, data: TaskData):
    """(tokenizer, sequence-classification model) with a fresh head for the task's labels, in
    float32 whatever dtype the checkpoint was saved in (the master weights of mixed precision;
    `device.Placement` autocasts the compute)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_path(s.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=data.num_labels, id2label=dict(enumerate(data.label_names)),
        label2id={n: i for i, n in enumerate(data.label_names)}, ignore_mismatched_sizes=True,
        dtype=torch.float32)
    return tokenizer, model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(settings: RunSettings, placement: Optional[Placement] = None
              ) -> Tuple[RunSettings, TaskData, MethodRun, Batches]:
    """Resolved settings, data, the method wrapped around a fresh model (on ``placement``'s
    device, default CPU), and the batches."""
    data = load_data(settings)
    s = resolve(settings, len(data.train))
    seed_everything(s.seed)
    tokenizer, model = load_model(s, data)
    if placement is not None:
        model = model.to(placement.device)
    run = build_method(model, s)
    batches = Batches(tokenizer, data.train, data.eval, s.max_seq_len, s.batch_size,
                      s.eval_batch_size, s.seed)
    return s, data, run, batches


def _checkpointer(out: Path, run: MethodRun, s: RunSettings,
                  save_steps: int) -> Optional[Callable[[LoopState], None]]:
    if save_steps <= 0:
        return None

    def on_step_end(state: LoopState) -> None:
        if state.step % save_steps == 0 and state.step < s.max_steps:
            save_checkpoint(out / f"{CHECKPOINT_PREFIX}{state.step}", run, s, state)
            for old in out.glob(f"{CHECKPOINT_PREFIX}*"):
                if old.name != f"{CHECKPOINT_PREFIX}{state.step}" and old.is_dir():
                    shutil.rmtree(old)
    return on_step_end


def _matplotlib_available(missing: str) -> bool:
    """Whether the plots can be drawn; warns, naming what is not drawn, when they cannot (a
    bare CUDA image may lack matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(f"matplotlib is not installed, so {missing} not drawn (the numbers are in "
                      "metrics.json and the allocation log); `pip install matplotlib` for it")
        return False
    return True


def write_outputs(out: Path, run: MethodRun, metrics: Dict) -> None:
    """Adapter (or model), metrics.json, and for rank-allocating methods the heatmap; for
    IncreLoRA also the allocation log and each module's rank against the step."""
    run.save_artifacts(out)
    pattern = run.rank_pattern()
    plots = run.name in ("increlora", "adalora") and bool(pattern) and _matplotlib_available(
        f"{HEATMAP_FILE}" + (f" and {RANK_OVER_TIME_FILE} are" if run.name == "increlora"
                             else " is"))
    if plots:
        from ..visualize import save_rank_heatmap
        save_rank_heatmap(pattern, out / HEATMAP_FILE, title=f"{run.name} rank pattern")
    if run.name == "increlora":
        lines = [json.dumps(entry, sort_keys=True) for entry in run.allocation_log()]
        (out / ALLOCATION_LOG_FILE).write_text("".join(line + "\n" for line in lines))
        if plots:
            from ..visualize import save_rank_over_time
            save_rank_over_time({name: run.config.init_r for name in pattern},
                                run.allocation_log(), out / RANK_OVER_TIME_FILE,
                                last_step=metrics.get("steps"))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))


def run_finetune(settings: RunSettings, output_dir: str, resume: Optional[str] = None,
                 save_steps: int = 0, progress: bool = True,
                 echo: Callable[[str], None] = print) -> Dict:
    """Train, evaluate on the dev split and write the outputs; returns the metrics.

    Args:
        settings: the run; ignored in favour of the checkpoint's own when ``resume`` is given.
        output_dir: created if missing.
        resume: a ``checkpoint-<step>`` folder written by an earlier run.
        save_steps: write a checkpoint every this many steps (0: never); only the newest is kept.
        progress: show a tqdm bar.
        echo: receives a one-line description of the run before training starts.
    """
    t_start = time.perf_counter()
    if resume:
        settings = read_checkpoint_settings(Path(resume))
    place = Placement.from_text(settings.device, settings.precision)
    reset_peak_memory(place.device)
    s, data, run, batches = build_run(settings, place)
    state = load_checkpoint(Path(resume), run) if resume else LoopState()
    echo(f"{s.method} on {data.name} ({len(data.train):,} train / {len(data.eval):,} dev), "
         f"model {s.model}: {s.max_steps} steps x batch {batches.batch_size}, lr {s.lr:g}, "
         f"seed {s.seed}, on {place.describe()}"
         + (f", resuming at step {state.step}" if resume else ""))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_loop(run, batches, s.max_steps, s.grad_clip, state, progress=progress,
               on_step_end=_checkpointer(out, run, s, save_steps), placement=place)
    t_eval = time.perf_counter()
    metrics = evaluate(run, batches, place)
    metrics.update(peak_memory(place.device), device=str(place.device),
                   precision=place.precision, train_tokens=state.session_tokens,
                   tokens_per_second=tokens_per_second(state.session_tokens,
                                                       state.session_seconds))
    counts = run.parameter_counts()
    tail = state.losses[-max(1, len(state.losses) // 10):]
    metrics.update({
        "method": s.method, "task": data.name, "model": s.model, "seed": s.seed,
        "train_examples": len(data.train), "label_names": data.label_names,
        "steps": state.step, "epochs": round(state.step / batches.steps_per_epoch, 3),
        "train_loss": sum(tail) / len(tail), "train_losses": [round(v, 6) for v in state.losses],
        "train_seconds": round(state.train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "trainable_params_active": counts["active"], "trainable_params_padded": counts["padded"],
        "total_rank": run.total_rank(), "rank_pattern": run.rank_pattern(),
        "delta_w_norm": run.update_norm(),
        "method_settings": run.describe(), "settings": s.to_dict(),
        "resumed_from": str(resume) if resume else None,
    })
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_outputs(out, run, metrics)
    return metrics
