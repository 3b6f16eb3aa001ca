"""Issue 7 (1): 2-process data parallel training (gloo, CPU) allocates exactly as one process does.

torchrun (DDP, and FSDP2 and FSDP1 sharding the frozen base) and accelerate launch run
tests/ddp_worker.py: each rank takes half of the same global batch in two micro-batches. With the
opt-in exact-step score the reference is one process on the whole global batch in one pass; with
the default fused per-pass score (issue 13) it is one process on the global batch in 2 x 2
micro-batches. torchrun also runs `IncreLoRATrainer` (``ddp_worker.py trainer``), compared in the
same way with the Trainer in this process.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.distributed as dist

import ddp_worker

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")


def _env():
    """CPU only, one thread per process, and the repository importable by the workers."""
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd, out_dir):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, \
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def reference():
    return ddp_worker.run_single_process()


@pytest.fixture(scope="module")
def reference_micro():
    return ddp_worker.run_single_process(micro=2 * ddp_worker.MICRO)


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """One torchrun launch of 2 processes: runs "ddp", "ddp_default", "ddp_rank_seeds", "fsdp2",
    "fsdp1" and "fsdp1_sharded_adapter"; ``.out``: the folder they wrote into."""
    out = tmp_path_factory.mktemp("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(TESTS / "ddp_worker.py"), "torchrun", str(out)]
    return _Runs(_launch(cmd, out), out)


class _Runs(list):
    """The ranks' results and, as ``out``, the folder the launch wrote into."""

    def __init__(self, ranks, out):
        super().__init__(ranks)
        self.out = out


def _same_on_both_ranks(r0, r1, exact=True):
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["exact_step_score"] is r1["exact_step_score"] is exact
    assert r0["allocation_log"] == r1["allocation_log"] and r0["allocation_log"]
    assert r0["rank_pattern"] == r1["rank_pattern"]
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key


def _equal_to_single_process(run, reference):
    assert not reference["exact_step_score"]
    assert len(set(run["rank_pattern"].values())) > 1  # the budget went to some modules only
    ref_log = reference["allocation_log"]
    assert [(e["step"], e["module"], e["new_rank"]) for e in run["allocation_log"]] == \
        [(e["step"], e["module"], e["new_rank"]) for e in ref_log]
    for ours, theirs in zip(run["allocation_log"], ref_log):
        assert ours["score"] == pytest.approx(theirs["score"], rel=1e-4)
    assert run["rank_pattern"] == reference["rank_pattern"]
    torch.testing.assert_close(run["ipt"], reference["ipt"], rtol=1e-4, atol=0)
    torch.testing.assert_close(run["unc"], reference["unc"], rtol=1e-3, atol=0)
    for key, value in reference["state"].items():
        torch.testing.assert_close(run["state"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_torchrun_ddp_two_ranks_equal_one_process(torchrun_runs, reference):
    r0, r1 = (r["ddp"] for r in torchrun_runs)
    _same_on_both_ranks(r0, r1)
    _equal_to_single_process(r0, reference)


def test_torchrun_ddp_default_fused_score_summed_over_ranks(torchrun_runs, reference_micro,
                                                           reference):
    """exact_step_score=None is the fused per-pass score under torch.distributed too: each rank
    scores its micro-batches, one all-reduce of the (num_modules,) vector averages them, so both
    ranks decide as one process scoring the 4 micro-batches of the global batch."""
    r0, r1 = (r["ddp_default"] for r in torchrun_runs)
    _same_on_both_ranks(r0, r1, exact=False)
    _equal_to_single_process(r0, reference_micro)
    # not the one-pass score of the global batch (that is what exact_step_score=True gives)
    assert not torch.allclose(r0["ipt"], reference["ipt"], rtol=1e-3)


def _sharded_base_run(torchrun_runs, reference, key: str, missing: str) -> Dict:
    """Rank 0's record of the run ``key`` (skipped with ``missing`` where this torch has none),
    checked to have sharded the frozen base weights alone and to equal one process."""
    if key not in torchrun_runs[0]:
        pytest.skip(missing)
    r0, r1 = (r[key] for r in torchrun_runs)
    assert r0["sharded"] and all(".base_layer." in k for k in r0["sharded"])
    _same_on_both_ranks(r0, r1)
    _equal_to_single_process(r0, reference)
    return r0


def test_torchrun_fsdp2_sharded_base_equals_one_process(torchrun_runs, reference):
    _sharded_base_run(torchrun_runs, reference, "fsdp2",
                      "this torch has no torch.distributed.fsdp.fully_shard")


def test_torchrun_fsdp1_sharded_base_equals_one_process(torchrun_runs, reference):
    """FSDP1 (use_orig_params=True, one unit per adapted module) shards the frozen base, the
    adapter and head are kept whole (``ignored_states``): both ranks decide alike and train as
    one process, under the model's own module names, and rank 0's saved adapter (training state)
    loads into a plain model with its trained values."""
    from increlora_fast import load_adapter

    r0 = _sharded_base_run(torchrun_runs, reference, "fsdp1",
                           "this torch has no torch.distributed.fsdp.FullyShardedDataParallel")
    model, _ = ddp_worker.build()
    load_adapter(model, torchrun_runs.out / "fsdp1_adapter")
    for key, value in model.state_dict().items():
        if ".base_layer." not in key:  # adapter slots, their states and stamps, head
            assert torch.equal(value, r0["state"][key]), key


def test_torchrun_fsdp1_sharding_the_adapter_is_refused_in_one_line(torchrun_runs):
    """FSDP1 left to shard lora_A/lora_B/lora_lambda turns them into flat 1-D shards outside
    the forward pass (empty on rank 1): building the controller or the optimizer on them is
    refused, naming FSDP1 and what to do instead, not left to fail later inside the penalty or
    the optimizer with a shape error."""
    if "fsdp1_sharded_adapter" not in torchrun_runs[0]:
        pytest.skip("this torch has no torch.distributed.fsdp.FullyShardedDataParallel")
    for rank in torchrun_runs:
        errors = rank["fsdp1_sharded_adapter"]["errors"]
        for name, message in errors.items():
            assert "FSDP1" in message and "body.branches.0" in message, (name, message)
            assert "ignored_states" in message and "fully_shard" in message, (name, message)
            assert "\n" not in message


def test_torchrun_fsdp1_default_sharded_base_saves_on_one_rank(torchrun_runs):
    """FSDP1's default ``use_orig_params=False`` leaves plain tensor views of its flat parameters
    in the base linears, without the ``_fsdp_flattened`` mark, whose storage is freed after a
    pass: the fingerprint read them and save_adapter on rank 0 failed ("setStorage: ... out of
    bounds for storage of size 0"). They are recorded as sharded (their shape), as FSDP2's."""
    from increlora_fast import load_adapter

    if "fsdp1_default_save" not in torchrun_runs[0]:
        pytest.skip("this torch has no torch.distributed.fsdp.FullyShardedDataParallel")
    run = torchrun_runs[0]["fsdp1_default_save"]
    assert run["error"] == ""
    assert run["modules"] and all(e.endswith(":sharded") for e in run["modules"].values()), \
        run["modules"]
    model, _ = ddp_worker.build()
    load_adapter(model, torchrun_runs.out / "fsdp1_default_adapter")


def test_ranks_with_different_seeds_keep_identical_parameters(torchrun_runs):
    r0, r1 = (r["ddp_rank_seeds"] for r in torchrun_runs)
    _same_on_both_ranks(r0, r1)


def test_accelerate_launch_two_ranks_equal_one_process(tmp_path, reference):
    pytest.importorskip("accelerate")
    # `--cpu` selects accelerate's single-process (or mpirun) launcher; `--multi_gpu` on a machine
    # whose GPUs are hidden starts 2 torch.distributed processes that Accelerate runs as MULTI_CPU
    # with gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(TESTS / "ddp_worker.py"), "accelerate", str(tmp_path)]
    r0, r1 = (r["accelerate"] for r in _launch(cmd, tmp_path))
    _same_on_both_ranks(r0, r1)
    _equal_to_single_process(r0, reference)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """One torchrun launch of 2 processes running `IncreLoRATrainer` (`ddp_worker.run_trainer`):
    "trainer" (default score, the model's own ``accepts_loss_kwargs``) and "trainer_exact"
    (exact-step score, ``accepts_loss_kwargs=False``), each rank 2 micro-batches of 4 rows per
    step. Returns the output folder and the 2 ranks' results."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("trainer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(TESTS / "ddp_worker.py"), "trainer", str(out)]
    return out, _launch(cmd, out)


@pytest.mark.parametrize("name, micro_batches, micro_batch, accepts_loss_kwargs", [
    ("trainer", 4, ddp_worker.TRAINER_MICRO_BATCH, None),
    ("trainer_exact", 1, 4 * ddp_worker.TRAINER_MICRO_BATCH, False)])
def test_increlora_trainer_under_torchrun_equals_one_process(trainer_runs, tmp_path, name,
                                                             micro_batches, micro_batch,
                                                             accepts_loss_kwargs):
    """IncreLoRATrainer on 2 ranks x 2 micro-batches of 4 rows: both ranks take the same rounds
    and end bit-identical, and allocate and train as one process on the same global batch of 16
    rows (float tolerance): in 4 micro-batches of 4 for the default fused score (with BERT's
    ``accepts_loss_kwargs``, under which transformers scales the loss by the world size and
    not by the accumulation steps, alike in both), in one pass for the exact-step score. The
    Trainer shards every step's global batch between the ranks (``rows``)."""
    _, (r0, r1) = trainer_runs
    r0, r1 = r0[name], r1[name]
    _same_on_both_ranks(r0, r1, exact=name == "trainer_exact")
    reference = ddp_worker.run_trainer(str(tmp_path), micro_batches=micro_batches,
                                       micro_batch=micro_batch,
                                       accepts_loss_kwargs=accepts_loss_kwargs)
    per_rank, whole = 2 * ddp_worker.TRAINER_MICRO_BATCH, 4 * ddp_worker.TRAINER_MICRO_BATCH
    for step in range(ddp_worker.TRAINER_STEPS):
        ours = r0["rows"][step * per_rank:(step + 1) * per_rank] + \
            r1["rows"][step * per_rank:(step + 1) * per_rank]
        assert sorted(ours) == sorted(reference["rows"][step * whole:(step + 1) * whole]), step
    _equal_to_single_process(r0, reference)


def test_increlora_trainer_under_torchrun_saves_on_rank_0_and_resumes(trainer_runs, tmp_path):
    """Only rank 0 writes the controller into the checkpoints (rank 1 has ``should_save``
    False), the final model holds rank 0's weights, 2 ranks resumed from the mid-run
    checkpoint end bit-identical to the uninterrupted run, and one process resumed from it ends
    there too (float tolerance)."""
    from safetensors.torch import load_file

    out, runs = trainer_runs
    for rank in runs:
        resumed = rank["trainer_resumed"]
        assert resumed["allocation_log"] == runs[0]["trainer"]["allocation_log"]
        for key, value in runs[0]["trainer"]["state"].items():
            assert torch.equal(resumed["state"][key], value), key
    r0, r1 = (rank["trainer"] for rank in runs)
    checkpoints = ddp_worker.TRAINER_STEPS // ddp_worker.TRAINER_SAVE_STEPS
    assert (r0["controller_saves"], r1["controller_saves"]) == (checkpoints, 0)
    middle = out / "trainer" / f"checkpoint-{ddp_worker.TRAINER_SAVE_STEPS}"
    assert (middle / "increlora_controller.pt").is_file()
    final = load_file(str(out / "trainer" / "final" / "model.safetensors"))
    assert any(key.endswith("lora_A") for key in final)
    for key, value in final.items():
        assert torch.equal(value, r0["state"][key]), key
    resumed = ddp_worker.run_trainer(str(tmp_path), micro_batches=4,
                                     resume_from_checkpoint=str(middle))
    assert resumed["controller_saves"] == checkpoints - 1
    _equal_to_single_process(resumed, r0)
