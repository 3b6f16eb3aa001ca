"""Issue 29: a run that learned nothing says so, and the options meant for small data of one's
own (on a tiny random BERT and tiny files, offline)."""
from __future__ import annotations

import contextlib
import functools
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import finetune_helpers
from finetune_helpers import cli, sentiment_rows, tiny_files, write_csv
from increlora_fast.training.finetune_run import MANY_TRUNCATED, no_learning_note
from increlora_fast.training.loop import majority_baseline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=96, dev_rows=40)


tiny_args = functools.partial(finetune_helpers.tiny_args, save_steps=0)



def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def summary_metrics(**changes) -> dict:
    """Metrics of a 3-class run at the majority's level (65 % 'neutral'), as run_finetune
    writes them."""
    m = {"eval_accuracy": 0.644, "eval_macro_f1": 0.30, "eval_majority_accuracy": 0.654,
         "eval_majority_macro_f1": 0.2636, "eval_majority_label": 1,
         "label_names": ["negative", "neutral", "positive"], "steps": 200,
         "max_seq_len": 64, "train_truncated_share": 0.95, "settings": {"lr": 8e-3}}
    m.update(changes)
    return m


def test_majority_baseline_is_the_constant_prediction():
    gold = torch.tensor([1, 1, 1, 0, 2, 1])
    base = majority_baseline(gold, n_classes=3)
    assert base["eval_majority_label"] == 1
    assert base["eval_majority_accuracy"] == pytest.approx(4 / 6)
    # F1 of class 1 = 2*4 / (6 + 4); classes 0 and 2 are present, never predicted: F1 0
    assert base["eval_majority_macro_f1"] == pytest.approx((8 / 10) / 3)


@pytest.mark.parametrize("gold", [torch.tensor([], dtype=torch.long),
                                  torch.tensor([[0, 1], [1, 1]])], ids=["empty", "2-D"])
def test_majority_baseline_refuses_gold_that_is_not_one_non_empty_row(gold):
    shape = re.escape(str(tuple(gold.shape)))
    with pytest.raises(ValueError, match=rf"majority_baseline: gold {shape} must be 1-D and "
                                         r"non-empty"):
        majority_baseline(gold, n_classes=2)


def test_a_loop_state_without_a_log_point_has_no_warm_rate():
    from increlora_fast.training.loop import LoopState
    assert LoopState().warm_tokens_per_second() is None


def test_a_run_at_the_majority_level_says_so_with_what_to_try():
    note = no_learning_note(summary_metrics())
    assert note.startswith("no better than always predicting 'neutral': dev accuracy 0.6440 vs "
                           "0.6540")
    assert "more steps" in note and "another --lr (it was 0.008)" in note
    assert "--max-seq-len auto (95% of the training texts were cut at 64 tokens)" in note
    # accuracy above the majority, macro-F1 not: still said
    assert no_learning_note(summary_metrics(eval_accuracy=0.70, eval_macro_f1=0.26))


def test_the_sequence_length_hint_needs_many_truncated_texts():
    note = no_learning_note(summary_metrics(train_truncated_share=0.05))
    assert note and "--max-seq-len" not in note


def test_a_run_that_learned_has_no_note():
    assert no_learning_note(summary_metrics(eval_accuracy=0.80, eval_macro_f1=0.6)) is None
    old = summary_metrics()
    del old["eval_majority_accuracy"]
    assert no_learning_note(old) is None  # metrics of a run older than the baseline


def test_metrics_record_the_majority_baseline_and_the_summary_flags_it(tiny, tmp_path, capsys):
    # every dev row is 'pos': always predicting it is perfect, so no run beats it
    dev = write_csv(tmp_path / "dev.csv", [dict(r, label="pos") for r in
                                           sentiment_rows(20, seed=3)])
    args = tiny_args(tiny, tmp_path / "run", "--max-steps", "1")
    args[args.index("--eval-file") + 1] = str(dev)
    assert cli(args) == 0
    m = read_metrics(tmp_path / "run")
    assert m["eval_majority_accuracy"] == 1.0 and m["eval_majority_macro_f1"] == 1.0
    assert m["label_names"][m["eval_majority_label"]] == "pos"
    assert m["max_seq_len"] == 16 and 0.0 <= m["train_truncated_share"] <= 1.0
    assert "learned nothing?  no better than always predicting 'pos'" in capsys.readouterr().out


def test_compare_table_shows_the_majority_baseline():
    from increlora_fast.training.compare import format_table
    from increlora_fast.training.settings import RunSettings

    run = {"lr": 1e-3, "lr_sweep": {"0.001": 0.65}, "seeds": [0], "eval_accuracy": [0.65],
           "mean": 0.65, "std": 0.0, "trainable_params_active": 10,
           "trainable_params_padded": 10, "total_rank": 24, "steps": 6, "train_examples": 96,
           "eval_examples": 40, "method_settings": {"r": 2, "lora_alpha": 16.0},
           "train_seconds": [1.0], "eval_majority_accuracy": 0.654}
    report = {"task": "file:train.csv", "seeds": 1, "lrs": {"lora": [1e-3]},
              "common": RunSettings().to_dict(), "methods": {"lora": run}}
    assert "always predicting the dev set's majority class scores 0.6540" in \
        format_table(report)


# --- issue 29, item 4: the options --------------------------------------------------------

def test_auto_max_seq_len_is_a_percentile_within_the_limits():
    from types import SimpleNamespace

    from increlora_fast.training.finetune_run import auto_max_seq_len
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    tokenizer = SimpleNamespace(model_max_length=256)
    lengths = list(range(1, 101))  # 95th percentile (nearest rank): 95
    assert auto_max_seq_len(lengths, tokenizer, model) == 95
    assert auto_max_seq_len([1000] * 10, tokenizer, model) == 256
    assert auto_max_seq_len([3] * 10, SimpleNamespace(model_max_length=int(1e30)), model) == 8



def test_max_seq_len_fits_positions_counted_after_the_padding_index():
    """RoBERTa-family models (XLM-R, CamemBERT, ...) number positions from padding_idx + 1, so
    of their max_position_embeddings (514 for roberta-base) two fewer tokens fit (512): a
    --max-seq-len of 514 passed the check and failed inside the first forward with an
    index error traceback, and --max-seq-len auto could choose it."""
    from types import SimpleNamespace

    import transformers

    from increlora_fast.training.finetune_run import auto_max_seq_len, check_max_seq_len
    from increlora_fast.training.settings import RunSettings
    config = transformers.RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32,
                                        max_position_embeddings=20, pad_token_id=1)
    model = transformers.RobertaForSequenceClassification(config).eval()
    fits = config.max_position_embeddings - config.pad_token_id - 1
    with torch.no_grad():
        model(input_ids=torch.full((1, fits), 5))  # the longest input the model takes
        with pytest.raises((IndexError, RuntimeError), match="out of"):
            model(input_ids=torch.full((1, fits + 1), 5))
    check_max_seq_len(RunSettings(max_seq_len=fits, model="tiny-roberta"), model)
    with pytest.raises(ValueError, match=rf"--max-seq-len {fits + 1} is invalid: .*use at most "
                                         rf"{fits}$"):
        check_max_seq_len(RunSettings(max_seq_len=fits + 1, model="tiny-roberta"), model)
    tokenizer = SimpleNamespace(model_max_length=int(1e30))
    assert auto_max_seq_len([100] * 10, tokenizer, model) == fits

def test_max_seq_len_auto_is_chosen_printed_and_kept_for_resume(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--max-seq-len", "auto", "--save-steps", "3")) == 0
    m = read_metrics(out)
    assert m["settings"]["max_seq_len"] == "auto" and isinstance(m["max_seq_len"], int)
    assert f"max_seq_len {m['max_seq_len']} (auto: 95th percentile" in capsys.readouterr().out
    resumed = tmp_path / "resumed"
    assert cli(["--resume", str(out / "checkpoint-3"), "--max-seq-len", "auto",
                "--output-dir", str(resumed), "--no-progress"]) == 0
    assert read_metrics(resumed)["max_seq_len"] == m["max_seq_len"]
    assert read_metrics(resumed)["eval_accuracy"] == m["eval_accuracy"]


def test_a_run_cutting_many_texts_says_so_at_its_start(tiny, tmp_path, capsys):
    """The share of training texts cut at --max-seq-len was printed only with auto length,
    pooling, class weights or select-best; a run cutting most texts said nothing until the
    no-learning note, if any."""
    rows = sentiment_rows(96, seed=0)
    long = write_csv(tmp_path / "long.csv", [dict(r, text=" ".join([r["text"]] * 3))
                                             for r in rows[:48]] + rows[48:])
    args = tiny_args(tiny, tmp_path / "cut", "--max-seq-len", "8", steps=1)
    args[args.index("--train-file") + 1] = str(long)
    assert cli(args) == 0
    share = read_metrics(tmp_path / "cut")["train_truncated_share"]
    assert share >= MANY_TRUNCATED
    assert f"max_seq_len 8, {share:.0%} of training texts cut" in capsys.readouterr().out
    args = tiny_args(tiny, tmp_path / "whole", "--max-seq-len", "64", steps=1)
    args[args.index("--train-file") + 1] = str(long)
    assert cli(args) == 0
    assert read_metrics(tmp_path / "whole")["train_truncated_share"] < MANY_TRUNCATED
    assert "of training texts cut" not in capsys.readouterr().out


def test_balanced_class_weights():
    from increlora_fast.training.loop import balanced_class_weights
    w = balanced_class_weights(torch.tensor([0, 0, 0, 1]), 3)
    # 4 rows, 2 classes present: 4 / (2 x 3) and 4 / (2 x 1); class 2 has no rows
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0, 0.0]))


def test_class_weights_weigh_the_training_loss(tiny):
    import torch.nn.functional as F

    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings
    from increlora_fast.training.step_runner import StepRunner
    s, _, run, batches = build_run(RunSettings(
        model=tiny["model"], task=None, train_file=tiny["train"], eval_file=tiny["dev"],
        batch_size=8, max_seq_len=16, max_steps=2, class_weights="balanced"))
    assert run.class_weights is not None and run.class_weights.shape == (2,)
    batch = batches.train_batch(0)
    runner = StepRunner(run)
    out = runner.forward_backward(0, dict(batch))
    expected = F.cross_entropy(out.logits.float(), batch["labels"], weight=run.class_weights)
    penalty = run.penalty()
    if penalty is not None:
        expected = expected + penalty
    torch.testing.assert_close(runner.loss.detach(), expected.detach())


def test_select_best_holds_out_rows_and_restores_the_best_state(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--select-best", "--select-every", "2",
                         "--save-steps", "3")) == 0
    m = read_metrics(out)
    assert m["holdout_examples"] == 10 and m["train_examples"] == 86
    assert m["selected_step"] in (2, 4, 6) and 0.0 <= m["holdout_accuracy"] <= 1.0
    # a resumed run carries the best state in its checkpoint and ends the same
    resumed = tmp_path / "resumed"
    assert cli(["--resume", str(out / "checkpoint-3"), "--output-dir", str(resumed),
                "--no-progress"]) == 0
    r = read_metrics(resumed)
    assert (r["selected_step"], r["holdout_accuracy"]) == (m["selected_step"],
                                                           m["holdout_accuracy"])
    assert r["eval_accuracy"] == m["eval_accuracy"]
    assert r["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("method", ["lora", "increlora"])
def test_best_state_keeps_the_better_score_and_restores_it(tiny, method):
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.loop import BestState, LoopState, evaluate
    from increlora_fast.training.settings import RunSettings
    s, _, run, batches = build_run(RunSettings(
        model=tiny["model"], task=None, train_file=tiny["train"], eval_file=tiny["dev"],
        batch_size=8, max_seq_len=16, max_steps=4, select_best=True, method=method))
    selector, state = BestState(run, batches, every=2, max_steps=4), LoopState(step=1)
    selector(state)
    assert state.best is None  # not a scoring step
    state.step = 2
    selector(state)
    assert state.best["step"] == 2
    kept = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    state.best["accuracy"] = 2.0  # nothing scores above it: step 4 does not replace step 2
    state.step = 4
    selector(state)
    assert state.best["step"] == 2
    selector.restore(state)
    for n, p in run.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), kept[n], msg=n)
    assert evaluate(run, batches, split="holdout")["eval_examples"] == len(batches.holdout)


def test_pooling_auto_reads_the_sentence_transformers_folder(tmp_path):
    from increlora_fast.pooling import pooling_of_folder, resolve_pooling
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    config = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    assert resolve_pooling("auto", tmp_path) == "mean"
    config.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    assert pooling_of_folder(tmp_path) == "cls"
    assert resolve_pooling("auto", tmp_path / "missing") == "cls"
    assert resolve_pooling("auto", None) == "cls" and resolve_pooling("mean", None) == "mean"


def test_mean_pooling_feeds_the_classifier_the_masked_mean(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from increlora_fast.pooling import apply_pooling
    model = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=2)
    model.eval()
    apply_pooling(model, "mean")
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    batch = tok(["good movie", "the plot was very dull and the acting flat"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        states = model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((states * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="--pooling max is not available"):
        apply_pooling(model, "max")


@pytest.mark.parametrize("argv, message", [
    (["--max-seq-len", "long"], "'long' is invalid: use an integer >= 8 (tokens) or auto"),
    (["--max-seq-len", "4"], "--max-seq-len 4 is invalid: use an integer >= 8 (tokens) or auto"),
    (["--select-every", "0", "--select-best"], "--select-every 0 is invalid: use an integer >= 1"),
    (["--select-best", "--method", "adalora"], "--select-best True is invalid: it is for "
                                               "increlora, lora and full"),
    (["--pooling", "max"], "invalid choice: 'max'"),
    (["--class-weights", "inverse"], "invalid choice: 'inverse'"),
])
def test_bad_option_values_name_the_option(argv, message, tmp_path, capsys):
    parse_error = "invalid choice" in message or "'long'" in message  # argparse exits 2
    with pytest.raises(SystemExit) if parse_error else contextlib.nullcontext():
        assert cli(argv + ["--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_the_note_reads_with_a_single_hint():
    m = summary_metrics(settings={}, train_truncated_share=0.0)
    assert no_learning_note(m).endswith("; try more steps (--max-steps or --epochs; it ran 200)")


def test_class_weights_keep_adaloras_orthogonal_penalty(tiny):
    """peft adds AdaLoRA's orthogonal penalty to the model's own loss, which the step does not
    use (it takes the loss from the logits, `forward_with_loss`): the run adds it itself, so the
    step's loss is the cross-entropy plus the penalty, with class weights or without (equal
    weights give the unweighted loss), or the peer trains without the penalty printed beside
    its numbers."""
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings
    from increlora_fast.training.step_runner import StepRunner
    _, _, run, batches = build_run(RunSettings(
        method="adalora", model=tiny["model"], task=None, train_file=tiny["train"],
        eval_file=tiny["dev"], batch_size=8, max_seq_len=16, max_steps=40, orth_reg_weight=1.0))
    batch = batches.train_batch(0)
    runner = StepRunner(run)
    out = runner.forward_backward(0, dict(batch))
    unweighted = runner.loss.detach()
    plain = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])
    with torch.no_grad():  # the model's own loss: peft's penalty in it
        own = run.model(**batch).loss
    assert float(own - plain) > 0.1
    torch.testing.assert_close(unweighted, own)
    run.class_weights = torch.ones(2)
    runner.forward_backward(0, dict(batch))
    torch.testing.assert_close(runner.loss.detach(), unweighted)


def test_a_steps_task_loss_is_unweighted_with_class_weights(tiny):
    """`StepRunner.step` trains on the weighted loss and reports the unweighted cross-entropy
    of the logits as its task loss, so that runs with and without weights compare."""
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings
    from increlora_fast.training.step_runner import StepRunner
    _, _, run, batches = build_run(RunSettings(
        model=tiny["model"], task=None, train_file=tiny["train"], eval_file=tiny["dev"],
        batch_size=8, max_seq_len=16, max_steps=40, orth_reg_weight=0.0))
    batch = batches.train_batch(0)
    run.class_weights = torch.tensor([1.0, 5.0])
    with torch.no_grad():
        logits = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"])
    weighted = torch.nn.functional.cross_entropy(logits, batch["labels"], weight=run.class_weights)
    assert abs(float(plain - weighted)) > 1e-3  # the weights change the loss
    runner = StepRunner(run)
    result = runner.step(0, dict(batch))
    torch.testing.assert_close(result.task_loss, plain)
    torch.testing.assert_close(runner.loss.detach(), weighted)


def _tiny_gpt2():
    """A 1-layer GPT-2 language model without dropout (token labels: the model's own loss)."""
    import transformers
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_adaloras_orthogonal_penalty_counts_once_with_token_labels():
    """A language model with token labels keeps its own loss (`forward_with_loss`), and peft
    has already added AdaLoRA's orthogonal penalty to it: the step's loss is the model's own,
    penalised once (found by an audit: the run added the penalty a second time)."""
    from increlora_fast.training.peft_methods import AdaLoRARun, adalora_orth_penalty
    from increlora_fast.training.settings import RunSettings, resolve
    from increlora_fast.training.step_runner import StepRunner
    torch.manual_seed(0)
    model = _tiny_gpt2()
    run = AdaLoRARun(model, resolve(RunSettings(
        method="adalora", target_modules=["c_attn"], max_steps=40, orth_reg_weight=1.0),
        train_size=16))
    ids = torch.randint(1, 40, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    runner = StepRunner(run)
    runner.forward_backward(0, dict(batch))
    with torch.no_grad():
        own = run.model(**batch).loss  # through peft's AdaLoRA: its penalty added
        bare = run.model.base_model.model(**batch).loss  # the transformers model's alone
        penalty = adalora_orth_penalty(run.model, 1.0)
    assert float(penalty) > 0.1
    torch.testing.assert_close(own, bare + penalty)
    torch.testing.assert_close(runner.loss.detach(), own, rtol=0, atol=0)


def test_a_step_with_token_labels_reports_the_models_own_loss():
    """`StepRunner.step` on a language model (token labels): the step's task loss is the model's
    own loss (before IncreLoRA's penalty), not a cross-entropy of (batch, seq, vocab) logits
    against (batch, seq) labels, which raised."""
    from increlora_fast.training.increlora_method import IncreLoRARun
    from increlora_fast.training.settings import RunSettings, resolve
    from increlora_fast.training.step_runner import StepRunner
    torch.manual_seed(0)
    model = _tiny_gpt2()
    run = IncreLoRARun(model, resolve(RunSettings(
        method="increlora", target_modules=["c_attn"], modules_to_save=[], max_steps=40,
        orth_reg_weight=1.0),
        train_size=16))
    ids = torch.randint(1, 40, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        own = run.model(**batch).loss
    result = StepRunner(run).step(0, dict(batch))
    torch.testing.assert_close(result.task_loss, own.float(), rtol=0, atol=0)
    assert int(result.tokens) == ids.numel()


def test_select_best_that_holds_out_every_row_of_a_label_warns_naming_it(tiny, tmp_path):
    # the label's only training row went to the held-out rows: the model never saw the label,
    # silently (--max-train-samples warns in that case)
    from increlora_fast.data.examples import Example, fixed_split
    rows = sentiment_rows(40, seed=5)
    _, held = fixed_split([Example(str(i), 0) for i in range(40)], 4)  # what --select-best holds out
    rows[int(held[0].text)]["label"] = "neutral"
    train = write_csv(tmp_path / "t.csv", rows)
    argv = tiny_args(tiny, tmp_path / "run", "--select-best")
    argv[argv.index("--train-file") + 1] = str(train)
    with pytest.warns(UserWarning, match=r"--select-best holds out every training row of "
                                         r"label\(s\) neutral"):
        assert cli(argv) == 0
    assert read_metrics(tmp_path / "run")["holdout_examples"] == 4


@pytest.mark.parametrize("modes", [["pooling_mode_max_tokens"],
                                   ["pooling_mode_mean_sqrt_len_tokens"],
                                   ["pooling_mode_lasttoken"],
                                   ["pooling_mode_mean_tokens", "pooling_mode_max_tokens"]])
def test_pooling_auto_refuses_a_folder_pooled_otherwise(tmp_path, modes):
    """A sentence-transformers folder pooling by max, mean/sqrt(len), last token, or by several
    modes at once was read as ``cls`` (or ``mean``) silently: the classifier read other states
    than the model was trained to give. ``auto`` refuses it, naming the file and the modes."""
    from increlora_fast.pooling import resolve_pooling
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    config = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              **{mode: True for mode in modes}}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        resolve_pooling("auto", tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--pooling auto: ")
    assert str(tmp_path / "1_Pooling" / "config.json") in message
    assert all(mode in message for mode in modes)
    assert resolve_pooling("cls", tmp_path) == "cls"


def test_select_best_with_too_few_training_rows_names_select_best(tiny, tmp_path, capsys):
    """--select-best on a training split of one row (--max-train-samples 1) stopped with
    fixed_split's 'need more than 1 examples to hold out a dev split of 1, got 1', naming no
    option; the error now names --select-best and the rows it has."""
    argv = tiny_args(tiny, tmp_path / "run", "--select-best", "--max-train-samples", "1")
    with pytest.warns(UserWarning):  # the kept rows miss a dev label
        assert cli(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--select-best" in err[0] and "has only 1" in err[0], err


@pytest.mark.parametrize("damage", ["missing", "damaged", "not a list"])
def test_pooling_auto_warns_when_the_named_pooling_config_cannot_be_read(tmp_path, damage):
    """A modules.json naming a Pooling module whose config is missing (a hub cache holding part
    of a snapshot) or damaged gave cls without a word: the folder says the model pools, and auto
    could not read how. It still gives cls, and says so in one line naming the file."""
    from increlora_fast.pooling import pooling_of_folder
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(
        json.dumps({"modules": modules}) if damage == "not a list" else json.dumps(modules))
    if damage == "damaged":
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": tr')
    with pytest.warns(UserWarning, match="--pooling auto: .*could not be read.*cls is used") \
            as caught:
        assert pooling_of_folder(tmp_path) == "cls"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    # a sentence-transformers folder without a Pooling module: cls, nothing to warn about
    (tmp_path / "modules.json").write_text(json.dumps(modules[:1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pooling_of_folder(tmp_path) == "cls"
