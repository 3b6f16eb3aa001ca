#!/usr/bin/env bash
# The test suite and the AOT kernel build under the GPU machine's library versions (torch 2.11,
# Triton 3.6, transformers 5.17, peft 0.21; docs/gpu_session.md), on this CPU: CI runs newer
# ones, and code that only works there fails on the GPU machine (2026-12-05: the Trainer
# integration on transformers 5.17, a kernel's shared memory under Triton 3.6).
#
#   bash scripts/gpu_versions_check.sh [VENV]     (default .venv-gpu-versions, git-ignored)
#
# Makes VENV (with the system site-packages, for the data packages) where nothing is; a CUDA
# build of torch 2.11 from PyPI, several GB. Two passes: Triton 3.6's interpreter fails under
# NumPy 2, and pyarrow and pandas (the tests that use transformers' Trainer or TRL, through
# datasets and the Trainer) need NumPy 2, so the first pass runs with NumPy 1.26 installed in
# VENV and the second with the system's NumPy (VENV's removed). It changes only a VENV it made (marked by a file in it) and refuses any other.
set -euo pipefail
VENV="$(realpath -m "${1:-$(dirname "$0")/../.venv-gpu-versions}")"
MARK="$VENV/.made-by-gpu-versions-check"
cd "$(dirname "$0")/.."
if [ ! -e "$VENV" ]; then
  python -m venv --system-site-packages "$VENV"
  touch "$MARK"
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" \
    "peft==0.21.0"
elif [ ! -e "$MARK" ]; then
  echo "gpu_versions_check.sh: $VENV exists and was not made by this script; give a new path" >&2
  exit 2
fi
# whole files, or single tests (file::name) of files whose other tests need NumPy 1.26
NEEDS_NUMPY2="tests/test_failed_calls.py tests/test_trainer.py tests/test_trainer_save.py tests/test_trainer_fp16.py tests/test_trainer_logging.py tests/test_trainer_rerun.py
  tests/test_trl.py tests/test_authors_reference.py tests/test_weight_decay_groups.py
  tests/test_readme.py tests/test_data.py
  tests/test_bad_inputs.py::test_offline_glue_task_fails_at_once_in_one_line
  tests/test_audit_algo.py::test_a_plain_trainer_with_increlora_optimizers_decays_as_the_trainer_would
  tests/test_optimizer.py::test_a_torch_scheduler_over_the_optimizer_is_said_once
  tests/test_quantized.py::test_increlora_trainer_trains_a_transformers_4bit_model
  tests/test_quantized.py::test_prepare_model_for_kbit_training_after_injection_is_named_before_training
  tests/test_quantized.py::test_prepare_model_for_kbit_training_before_injection_trains_with_checkpointing
  tests/test_ddp.py::test_increlora_trainer_under_torchrun_equals_one_process
  tests/test_ddp.py::test_increlora_trainer_under_torchrun_saves_on_rank_0_and_resumes"
ignore=()
for f in $NEEDS_NUMPY2; do
  if [[ $f == *::* ]]; then ignore+=(--deselect="$f"); else ignore+=(--ignore="$f"); fi
done
"$VENV/bin/pip" install -q "numpy==1.26.4"
echo "== pass 1 (NumPy 1.26): everything but $NEEDS_NUMPY2"
# (Triton 3.6 builds a few variants with small stack frames, listed in docs/kernels.md)
INCRELORA_AOT_STACK_OK=1 PYTHONPATH=. "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  "${ignore[@]}" tests || status=$?
if [ "${status:-0}" -ge 2 ]; then  # interrupted or not run (pytest's codes 2-5), not failures
  exit "$status"
fi
"$VENV/bin/pip" uninstall -y -q numpy
echo "== pass 2 (the system's NumPy): $NEEDS_NUMPY2"
# Left out: the Trainer-under-torchrun tests (their shared workers resume a run mid-way), as
# transformers 5.17's Trainer resumes its optimizer with torch.load(map_location=args.device),
# which is "cpu:0" under torchrun on CPU, and torch 2.11 cannot restore storages to "cpu:0"
# ("don't know how to restore data location ... (tagged with cpu:0)"); a GPU run's device is
# cuda:N. Not this package's code: CI's versions pass them.
UPSTREAM=tests/test_ddp.py::test_increlora_trainer_under_torchrun
# shellcheck disable=SC2086
PYTHONPATH=. "$VENV/bin/python" -m pytest -q -p no:cacheprovider --deselect "$UPSTREAM" \
  $NEEDS_NUMPY2 || status=$?
exit "${status:-0}"
