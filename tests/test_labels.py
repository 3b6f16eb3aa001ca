"""Labels: integers that are not 0..K-1 get a compact index saved beside the adapter; continuous
values are refused with one clear line (issue 14 item 5)."""
from __future__ import annotations

import json
import warnings

import pytest
from safetensors.torch import load_file

from finetune_helpers import cli, sentiment_rows, write_csv, write_jsonl, write_tiny_bert
from increlora_fast.data import load_files
from increlora_fast.data.examples import LabelSpellingWarning, label_names_for


def _relabel(rows, mapping):
    return [dict(r, label=mapping[r["label"]]) for r in rows]


def test_sparse_integer_labels_get_a_compact_index(tmp_path):
    train = write_csv(tmp_path / "t.csv", _relabel(sentiment_rows(40, 0),
                                                   {"neg": "0", "pos": "1000000"}))
    dev = write_csv(tmp_path / "d.csv", _relabel(sentiment_rows(10, 1),
                                                 {"neg": "0", "pos": "1000000"}))
    data = load_files(str(train), str(dev))
    assert data.num_labels == 2 and data.label_names == ["0", "1000000"]
    assert {e.label for e in data.train + data.eval} == {0, 1}
    negative = write_csv(tmp_path / "n.csv", _relabel(sentiment_rows(40, 0),
                                                      {"neg": "-1", "pos": "1"}))
    assert load_files(str(negative), None).label_names == ["-1", "1"]


def test_sparse_labels_train_a_two_way_head_and_save_the_mapping(tmp_path):
    model = write_tiny_bert(tmp_path / "bert")
    train = write_csv(tmp_path / "t.csv", _relabel(sentiment_rows(64, 0),
                                                   {"neg": "0", "pos": "1000000"}))
    out = tmp_path / "out"
    assert cli(["--model", str(model), "--train-file", str(train), "--batch-size", "8",
                "--max-seq-len", "16", "--max-steps", "2", "--no-progress",
                "--output-dir", str(out)]) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert labels["id2label"] == {"0": "0", "1": "1000000"}
    assert labels["label2id"] == {"0": 0, "1000000": 1}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    (head,) = [k for k in tensors if k.endswith("classifier.weight")]
    assert tensors[head].shape[0] == 2


def test_continuous_labels_are_one_clear_error(tmp_path, capsys):
    rows = sentiment_rows(40, 0)
    for i, r in enumerate(rows):
        r["label"] = f"{0.1 * (i % 14) + 0.05:.2f}"
    train = write_csv(tmp_path / "scores.csv", rows)
    code = cli(["--model", str(tmp_path / "nowhere"), "--train-file", str(train),
                "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1
    assert str(train) in err[0] and "continuous values" in err[0] and "discrete" in err[0]


@pytest.mark.parametrize("labels", [("0.0", "1.0"), ("neg", "pos")])
def test_discrete_labels_still_work(tmp_path, labels):
    train = write_csv(tmp_path / "t.csv", _relabel(sentiment_rows(40, 0),
                                                   dict(zip(("neg", "pos"), labels))))
    assert load_files(str(train), None).label_names == sorted(labels)


def test_spellings_of_a_boolean_are_one_label(tmp_path):
    """A JSON label true was the class 'True' (Python's spelling), so a CSV eval file's 'true'
    (or Excel's 'TRUE') was refused as a label no training row has."""
    rows = _relabel(sentiment_rows(40, 0), {"neg": False, "pos": True})
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    dev = write_csv(tmp_path / "d.csv", _relabel(sentiment_rows(10, 1),
                                                 {"neg": "false", "pos": "TRUE"}))
    data = load_files(str(train), str(dev))
    assert data.label_names == ["False", "True"]
    by_text = {r["text"]: int(r["label"]) for r in sentiment_rows(10, 1, labels=(0, 1))}
    assert [e.label for e in data.eval] == [by_text[e.text] for e in data.eval]
    with pytest.warns(LabelSpellingWarning, match="spells 1 label.*'TRUE' and 'True' and 'true' "
                                                  "as 'true'"):
        assert label_names_for([True, "true", "TRUE", "False"]) == ["False", "true"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'yes' is no spelling of true
        assert label_names_for(["yes", "true", "no"]) == ["no", "true", "yes"]


def test_labels_in_two_unicode_forms_are_one_label_and_texts_are_kept(tmp_path):
    """'nég' composed (é) and decomposed (e + U+0301) look the same but were two classes, and an
    eval file saved in the other form was refused as unseen; texts are left as written."""
    composed, decomposed = "n\u00e9g", "ne\u0301g"
    rows = sentiment_rows(40, 0, labels=(composed, "pos"))
    rows[0]["text"] = "caf" + "e\u0301 " + rows[0]["text"]
    train = write_csv(tmp_path / "t.csv", rows)
    dev = write_csv(tmp_path / "d.csv", sentiment_rows(10, 1, labels=(decomposed, "pos")))
    data = load_files(str(train), str(dev))
    assert data.label_names == [composed, "pos"]
    assert [e.label for e in data.eval] == [r["label"] == "pos" for r in sentiment_rows(10, 1)]
    assert rows[0]["text"] in [e.text for e in data.train + data.eval]
    with pytest.warns(LabelSpellingWarning, match=f"spells 1 label.* as {composed!r}"):
        assert label_names_for([composed, decomposed, "pos"]) == [composed, "pos"]
