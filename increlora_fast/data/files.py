"""The user's own data: CSV/TSV or JSON-lines files with named text, text-pair and label columns."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from .examples import (_NUMBER, Example, TaskData, fixed_split, label_index, label_key,
                       label_names_for)

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSON_SUFFIXES = (".jsonl", ".json")
MAX_AUTO_DEV = 1000
# spellings of a missing value in a column of numeric labels (R's NA, str(None), JSON's null)
NUMERIC_MISSING = ("na", "n/a", "none", "null")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the identity of a data file or a checkpoint part)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_rows(path: Path, columns: Optional[List[str]] = None) -> Tuple[List[Dict[str, object]],
                                                                         Optional[List[int]]]:
    """(rows, the line of the file each row begins at, 1-based, or None for a ``.json`` list)
    of a CSV/TSV file (header line first) or of a JSON-lines file (one object a line; a
    ``.json`` file holding one list of objects also works). ``columns``: the columns the
    caller reads; a CSV/TSV header or a JSON record naming one of them twice is refused (None:
    any column)."""
    if path.is_dir():
        raise ValueError(f"data file {path} is a folder; give a file ("
                         f"{', '.join(sorted(CSV_SUFFIXES) + list(JSON_SUFFIXES))})")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES and suffix not in JSON_SUFFIXES:
        raise ValueError(f"data file {path} has suffix {suffix!r}; use one of "
                         f"{sorted(CSV_SUFFIXES) + list(JSON_SUFFIXES)}")
    raw = path.read_bytes()
    _refuse_utf16(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        before = raw[:err.start]  # lines end at "\n", "\r" or both, as the readers count them
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        raise ValueError(f"data file {path} is not UTF-8 text: line {line} holds byte "
                         f"0x{raw[err.start]:02x}; save it as UTF-8") from err
    if suffix in CSV_SUFFIXES:
        return _csv_rows(text, CSV_SUFFIXES[suffix], path, columns)
    lines: Optional[List[int]] = None
    repeated: Dict[int, List[str]] = {}  # id of an object -> the read fields it names twice
    hook = _repeated_fields_hook(columns, repeated)
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text, object_pairs_hook=hook)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    else:
        rows, lines = [], []
        # JSON lines end at "\n", "\r" or both, which JSON allows in no string raw
        # (str.splitlines would also cut a text holding U+2028, U+2029 or U+0085)
        for lineno, line in enumerate(io.StringIO(text, newline="").readlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line, object_pairs_hook=hook))
                    lines.append(lineno)
                except json.JSONDecodeError as err:
                    raise _json_lines_error(path, text, lineno, err) from err
        if len(rows) == 1 and _is_columns_layout(rows[0]):
            raise _columns_layout_error(path, rows[0])
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{_place(path, lines, bad)} is not a JSON object")
    bad = next((i for i, r in enumerate(rows) if id(r) in repeated), None)
    if bad is not None:  # json.loads keeps the last value of a repeated key
        raise ValueError(f"{_place(path, lines, bad)} names field(s) {repeated[id(rows[bad])]} "
                         "more than once; give every field its own name")
    return rows, lines


def _repeated_fields_hook(columns: Optional[List[str]], repeated: Dict[int, List[str]]):
    """A json ``object_pairs_hook`` that builds each object as a dict and records in
    ``repeated`` (by the dict's id) the keys of ``columns`` (None: any) it names twice."""
    def hook(pairs: List[Tuple[str, object]]) -> Dict[str, object]:
        record = dict(pairs)
        if len(record) < len(pairs):
            keys = [key for key, _ in pairs]
            twice = sorted({key for key in keys if keys.count(key) > 1
                            and (columns is None or key in columns)})
            if twice:
                repeated[id(record)] = twice
        return record
    return hook


def _refuse_utf16(path: Path, raw: bytes) -> None:
    """Refuse the bytes ``raw`` of ``path`` as UTF-16 text: they begin with its byte-order mark,
    or zero bytes are over a quarter of the first 4 KiB (UTF-8 text holds none; UTF-16 one
    beside each ASCII letter, which decoded as UTF-8 gives a header of garbled names)."""
    head = raw[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(0) > len(head) // 4:
        raise ValueError(f"data file {path} looks like UTF-16 text (a zero byte beside each "
                         "letter), not UTF-8; save it as UTF-8")


def _place(path: Path, lines: Optional[List[int]], index: int) -> str:
    """Where row ``index`` (0-based) of ``path`` is, for an error message: the file's line
    (1-based, the header and blank lines counted), or the record of a ``.json`` list."""
    return f"{path}: line {lines[index]}" if lines is not None else f"{path}: record {index + 1}"


def _json_lines_error(path: Path, text: str, lineno: int, err: json.JSONDecodeError) -> ValueError:
    """The one-line error for JSON-lines ``text`` whose line ``lineno`` is no JSON value: a
    file that is one (indented) JSON value over several lines is named as such, as its lines
    are not invalid JSON but pieces of one value."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return ValueError(f"{path}:{lineno} is not valid JSON: {err}")
    if _is_columns_layout(whole):
        return _columns_layout_error(path, whole)
    what = f"object (keys {list(whole)[:5]})" if isinstance(whole, dict) else \
        type(whole).__name__
    return ValueError(f"{path} holds one JSON {what} over several lines, not one record a "
                      "line; give a .json file holding a list of objects, or one object a line")


def _is_columns_layout(value: object) -> bool:
    """Whether the JSON ``value`` is one object of columns, each an object of row index ->
    cell: pandas' ``DataFrame.to_json()`` default layout."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(column, dict) for column in value.values())


def _columns_layout_error(path: Path, value: Dict[str, object]) -> ValueError:
    """The one-line error for a JSON file ``path`` that is one object of columns (see
    `_is_columns_layout`), naming the pandas call that writes records."""
    return ValueError(f"{path} holds one JSON object of columns (keys {list(value)[:5]}), "
                      "pandas' to_json() layout, not one record a row; write it with "
                      'to_json(orient="records", lines=True) (or orient="records" for a .json '
                      "list)")


def _csv_rows(text: str, delimiter: str, path: Path,
              columns: Optional[List[str]] = None) -> Tuple[List[Dict[str, object]], List[int]]:
    """(rows, the line each row begins at) of CSV/TSV ``text``, cells of any length included
    (the csv module's own limit, 131,072 characters, is lifted while this file is read). Cells
    a row lacks are None; a row whose every cell is empty (a spreadsheet's empty row) is
    skipped, with one warning.

    Raises:
        ValueError: the header names a column of ``columns`` (None: any) twice (which of the
            two would be read is a guess; a repeated name of another column is left alone, as
            the csv module reads it), or a row has more (non-empty) cells than
            the header: an unquoted delimiter in a text would otherwise shift the rest of its
            row into the label silently (the surplus cells are kept apart), or a
            TSV line opens a quote it does not close (`_check_tsv_quotes`), or a CSV quote never
            closes or closes before other text than the delimiter (`_quote_error`), or a row
            repeats the header (files joined with their headers; read as a row, it was an
            example of a class named like the label column).
    """
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    what = "comma" if delimiter == "," else "tab"
    try:
        records = _csv_records(text, path) if delimiter == "," else _tsv_records(text, path)
        _, header = next(records, (1, []))
        twice = sorted({name for name in header if name.strip() and header.count(name) > 1
                        and (columns is None or name in columns)})
        if twice:
            raise ValueError(f"{path}: the header names column(s) {twice} more than once; "
                             "give every column its own name")
        names = _strip_header(path, header, columns)
        rows, lines, empty = [], [], []
        for lineno, cells in records:
            if not any(cell.strip() for cell in cells):
                empty.append(lineno)
                continue
            if cells[-1:] == header[-1:] and [cell.lstrip("\ufeff") for cell in cells] == header:
                raise ValueError(f"{path}: line {lineno} repeats the header; remove it (were "
                                 "files joined with their headers?)")
            surplus = cells[len(header):]
            if any(cell.strip() for cell in surplus):
                raise ValueError(f"{path}: line {lineno} has {len(cells)} cells, the header "
                                 f'{len(header)}: a text holding a {what} must be quoted ("...")')
            rows.append(dict(zip(names, cells + [None] * (len(header) - len(cells)))))
            lines.append(lineno)
        if empty:
            _warn_empty_rows(path, empty)
        return rows, lines
    finally:
        csv.field_size_limit(limit)


def _strip_header(path: Path, header: List[str], columns: Optional[List[str]]) -> List[str]:
    """The column names of ``header``, each of ``columns`` that it lacks but writes once with
    spaces around (``text, label``) read as that column, with one warning (spaces around a
    label are dropped too); ``columns`` None (any column): the names as written."""
    names = list(header)
    stripped = [name.strip() for name in header]
    padded = [i for i, name in enumerate(header) if name != stripped[i]
              and columns is not None and stripped[i] in columns
              and stripped[i] not in header and stripped.count(stripped[i]) == 1]
    for i in padded:
        names[i] = stripped[i]
    if padded:
        warnings.warn(f"{path}: the header writes column(s) {[header[i] for i in padded]} with "
                      f"spaces around the name, read as {[names[i] for i in padded]}",
                      UserWarning, stacklevel=4)
    return names


def _warn_empty_rows(path: Path, lines: List[int]) -> None:
    """Say once that the rows at ``lines`` of ``path``, every cell empty, were skipped."""
    shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
    many = len(lines) > 1
    warnings.warn(f"{path}: {len(lines):,} {'rows' if many else 'row'} with every cell empty "
                  f"({'lines' if many else 'line'} {shown}) {'were' if many else 'was'} skipped",
                  UserWarning, stacklevel=4)


def _csv_records(text: str, path: Path) -> Iterator[Tuple[int, List[str]]]:
    """(the line a row begins at, its cells) for each non-blank row of CSV ``text``, read
    strictly: a stray quote is an error (`_quote_error`), not the start of a text that swallows
    later rows."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for cells in reader:
            if cells:
                yield start, cells
            start = reader.line_num + 1
    except csv.Error as err:
        raise _quote_error(path, text, start, reader.line_num, "comma", err) from err


# a TSV cell quoted as a whole: a quote, then text with any quote in it doubled, then a quote
# that ends the cell
_QUOTED_TSV_CELL = re.compile(r'"((?:[^"]|"")*)"(?=\t|\Z)')


def _tsv_records(text: str, path: Path) -> Iterator[Tuple[int, List[str]]]:
    """(line number, cells) for each non-blank line of TSV ``text``: a TSV row is one line
    (`_check_tsv_quotes` refuses a line whose quote does not close on it)."""
    _check_tsv_quotes(text, path)
    for lineno, line in enumerate(io.StringIO(text, newline=""), 1):
        line = line.rstrip("\r\n")
        if line:
            yield lineno, _tsv_cells(line)


def _tsv_cells(line: str) -> List[str]:
    """The tab-separated cells of one TSV ``line`` as written, but for a cell quoted as a whole
    (a tab or a doubled quote inside), which is unquoted: a text that merely begins with a
    quote (``"Best" movie ever``) keeps it."""
    cells, pos = [], 0
    while True:
        quoted = _QUOTED_TSV_CELL.match(line, pos) if line.startswith('"', pos) else None
        if quoted:
            cells.append(quoted.group(1).replace('""', '"'))
            end = quoted.end()
        else:
            end = line.find("\t", pos)
            end = len(line) if end < 0 else end
            cells.append(line[pos:end])
        if end >= len(line):
            return cells
        pos = end + 1


def _quote_error(path: Path, text: str, start: int, end: int, what: str,
                 err: csv.Error) -> ValueError:
    """The one-line error for a row that the csv reader refused at line ``end``; a CSV row
    (read strictly) that began at line ``start`` (blank lines before it skipped) and opens a
    quote that never closes, or closes before other text than the delimiter (a quote inside a
    quoted text is written doubled): read loosely, such a quote took the rows after it into
    one text. Any other error of the reader is named as it is, with its line."""
    if "end of data" not in str(err) and "expected after" not in str(err):
        return ValueError(f"{path}: line {end} cannot be read as {what}-separated text: {err}")
    # the lines as the csv reader counts them ("\n", "\r" or both; str.splitlines would also
    # break at U+2028 or a form feed inside a text)
    lines = io.StringIO(text, newline="").readlines()
    while start < len(lines) and not lines[start - 1].strip():
        start += 1
    if "end of data" in str(err):
        how = "never closes (every later line would be read into that text)"
    elif end == start:
        how = f"closes on that line before other text than a {what}"
    else:
        how = (f"closes at line {end} before other text than a {what} (lines {start}-{end} "
               "would be read as one text)")
    return ValueError(f'{path}: line {start} opens a quote (") that {how}; close the quote '
                      'after the text, and double a quote inside a quoted text '
                      '("say ""hi""")')


def _check_tsv_quotes(text: str, path: Path) -> None:
    """Refuse a TSV line that opens a quote and does not close it: a TSV row is one line, and
    the csv module would read the lines after it into that cell until the next quote, merging
    rows silently or failing rows later. A cell quoted within its line (a tab or a doubled
    quote inside) is fine; a quote that does not open a cell is text."""
    for lineno, line in enumerate(io.StringIO(text, newline=""), 1):
        if '"' not in line:
            continue
        cells = next(csv.reader([line.rstrip("\r\n") + "\n"], delimiter="\t"))
        if any("\n" in cell for cell in cells):  # the line break itself was read as text
            raise ValueError(f'{path}: line {lineno} opens a quote (") that does not close on '
                             'that line; a TSV row is one line: close the quote, write a quote '
                             'inside a quoted text doubled ("say ""hi"""), or save texts with '
                             'line breaks as .csv or .jsonl')


def _nan_marker(value: object, label: bool, numeric: bool = False) -> bool:
    """Whether a (non-empty) cell marks a missing value: a JSON NaN, or for a label also the
    text NaN (which pandas writes for a missing number), and beside ``numeric`` labels also
    `NUMERIC_MISSING` (R's NA, Python's None, null)."""
    if isinstance(value, float) and math.isnan(value):
        return True
    text = str(value).strip().lower()
    return label and (text.lstrip("+-") == "nan" or (numeric and text in NUMERIC_MISSING))


def _numeric_labels(values: List[object]) -> bool:
    """Whether a label column holds numbers, apart from cells that may mark missing ones."""
    texts = [str(v).strip() for v in values]
    return any(_NUMBER.fullmatch(t) for t in texts) and all(
        _NUMBER.fullmatch(t) or t.lower() in NUMERIC_MISSING for t in texts)


def _column(rows: List[Dict[str, object]], lines: Optional[List[int]], path: Path, name: str,
            option: str) -> List[object]:
    """The values of column ``name`` (set by ``option``), refused in one line naming the row's
    line (`_place`) where one is absent, empty, marks a missing value, is an infinite JSON
    number or is no single value."""
    if not any(name in r for r in rows):
        columns = list(dict.fromkeys(key for r in rows for key in r))
        raise ValueError(f"{path} has no column {name!r} (set by {option}); its columns are "
                         f"{columns}{_separator_hint(path, columns)}")
    absent = next((i for i, r in enumerate(rows) if name not in r), None)
    if absent is not None:  # a JSON record without the field the others have
        raise ValueError(f"{_place(path, lines, absent)} has no {name!r} ({option})")
    values = [r.get(name) for r in rows]
    missing = next((i for i, v in enumerate(values) if v is None or str(v).strip() == ""), None)
    if missing is not None:
        raise ValueError(f"{_place(path, lines, missing)} has an empty {name!r} ({option})")
    # NaN read as a label would be a class of its own ('nan'), as a text the word 'nan'; so
    # would NA or None beside numeric labels (among named labels 'none' may be a class)
    label = option == "--label-column"
    numeric = label and _numeric_labels(values)
    missing = next((i for i, v in enumerate(values)
                    if _nan_marker(v, label=label, numeric=numeric)), None)
    if missing is not None:
        raise ValueError(f"{_place(path, lines, missing)} has no {name!r} ({option}): "
                         f"{str(values[missing]).strip()!r} marks a missing value; fill in or "
                         "drop the row")
    infinite = next((i for i, v in enumerate(values) if isinstance(v, float) and math.isinf(v)),
                    None)
    if infinite is not None:  # JSON's Infinity (or 1e999) would be a class or a text 'inf'
        raise ValueError(f"{_place(path, lines, infinite)} holds "
                         f"{'-' if values[infinite] < 0 else ''}Infinity in {name!r} ({option}), "
                         "a JSON number that is not finite; fill in or drop the row")
    nested = next((i for i, v in enumerate(values) if isinstance(v, (list, dict))), None)
    if nested is not None:
        raise ValueError(f"{_place(path, lines, nested)} holds a JSON "
                         f"{type(values[nested]).__name__} in {name!r} ({option}), not a single "
                         "value")
    return values


def _separator_hint(path: Path, columns: List[str]) -> str:
    """Why the CSV/TSV ``path`` with header ``columns`` may lack a column, for an error message:
    a spreadsheet's ``sep=`` first line, or one column whose name holds another separator (a
    file saved with semicolons); "" when neither."""
    delimiter = CSV_SUFFIXES.get(path.suffix.lower())
    if delimiter is None or not columns:
        return ""
    first = delimiter.join(columns)
    if first.lower().startswith("sep="):
        return f"; its first line {first!r} is a spreadsheet's separator line: remove it"
    found = next((sep for sep in ";\t,|" if len(columns) == 1 and sep in columns[0]), None)
    if found is None:
        return ""
    how = {",": "commas", "\t": "tabs"}[delimiter]
    return f"; its one column {columns[0]!r} holds {found!r}: save the file separated by {how}"


def _raw_examples(path: Path, text_column: str, text_pair_column: Optional[str],
                  label_column: str) -> tuple:
    """(texts, text pairs or Nones, labels, the rows' lines as `read_rows` gives them) of the
    data file ``path``."""
    rows, lines = read_rows(path, [c for c in (text_column, text_pair_column, label_column) if c])
    if not rows:
        raise ValueError(f"data file {path} is empty: it holds no rows")
    texts = _column(rows, lines, path, text_column, "--text-column")
    pairs = _column(rows, lines, path, text_pair_column, "--text-pair-column") \
        if text_pair_column else [None] * len(rows)
    labels = _column(rows, lines, path, label_column, "--label-column")
    return texts, pairs, labels, lines


def _text_key(example: Example) -> tuple:
    """The text (and text pair) of ``example``, surrounding whitespace aside: rows with one key
    repeat one text."""
    pair = example.text_pair
    return example.text.strip(), None if pair is None else pair.strip()


def _drop_repeated_texts(path: Path, examples: List[Example]) -> List[Example]:
    """``examples`` without those whose text (and text pair) an earlier one has, surrounding
    whitespace aside, so that no text is in both the training rows and the automatic dev split;
    the first example of a text is kept, also over a later one with another label. One warning
    counts the rows dropped."""
    first: Dict[tuple, int] = {}
    kept, conflicting = [], 0
    for e in examples:
        key = _text_key(e)
        if key in first:
            conflicting += first[key] != e.label
            continue
        first[key] = e.label
        kept.append(e)
    dropped = len(examples) - len(kept)
    if dropped:
        other = f" ({conflicting:,} of them with another label)" if conflicting else ""
        rows = "rows repeat" if dropped > 1 else "row repeats"
        warnings.warn(f"{path}: {dropped:,} {rows} the text of an earlier row{other} and "
                      f"{'were' if dropped > 1 else 'was'} dropped, the first row of each text "
                      "kept, so that no text is in both the training rows and the automatic dev "
                      "split", UserWarning, stacklevel=3)
    return kept


def _check_labels_kept(path: Path, examples: List[Example], label_names: List[str]) -> None:
    """Refuse ``examples`` of ``path`` left with a single label by `_drop_repeated_texts` (every
    row of the others repeated the text of an earlier row of another label), and warn about
    labels it left without rows beside two or more others: the model cannot learn them."""
    kept = sorted({e.label for e in examples})
    gone = [name for i, name in enumerate(label_names) if i not in kept]
    if not gone:
        return
    what = (f"every row of label(s) {gone} repeats the text of an earlier row of another label "
            "and was dropped")
    if len(kept) < 2:
        raise ValueError(f"{path}: {what}, leaving a single label {[label_names[kept[0]]]}; "
                         "classification needs at least two")
    warnings.warn(f"{path}: {what}: the model cannot learn them; give rows of distinct texts for "
                  "them", UserWarning, stacklevel=3)


def _warn_if_same_data(train_file: str, eval_file: str) -> bool:
    """Warn when ``eval_file`` is ``train_file`` (the same file, or a copy of its bytes): the
    dev accuracy then measures the training data. Whether it warned."""
    train_path, eval_path = Path(train_file), Path(eval_file)
    if not (train_path.is_file() and eval_path.is_file()):
        return False  # (`read_rows` names a folder)
    if train_path.samefile(eval_path):
        how = "are the same file"
    elif train_path.stat().st_size == eval_path.stat().st_size and \
            file_sha256(train_path) == file_sha256(eval_path):
        how = "hold the same content"
    else:
        return False
    warnings.warn(f"--train-file {train_file} and --eval-file {eval_file} {how}: the dev accuracy "
                  "then measures the training data; give held-out rows as --eval-file, or leave "
                  "it out for an automatic dev split", UserWarning, stacklevel=3)
    return True


def _warn_if_shared_texts(train_file: str, eval_file: str, train: List[Example],
                          dev: List[Example]) -> None:
    """Warn counting the rows of ``dev`` (of ``eval_file``) that repeat the text (and text
    pair) of a row of ``train`` (of ``train_file``), surrounding whitespace aside: the dev
    accuracy then partly measures the training data."""
    seen = {_text_key(e) for e in train}
    shared = sum(_text_key(e) in seen for e in dev)
    if shared:
        warnings.warn(f"--eval-file {eval_file}: {shared:,} of its {len(dev):,} rows repeat the "
                      f"text of a row of --train-file {train_file}: the dev accuracy then partly "
                      "measures the training data; drop them from one file", UserWarning,
                      stacklevel=3)


def _swap_hint(path: Path, label_column: str) -> str:
    return (f"check column {label_column!r} of {path} (--label-column): are --text-column and "
            "--label-column swapped?")


def check_data_file(option: str, given: str) -> None:
    """Refuse ``given``, the data file of ``option``, in one line unless it is a regular file:
    a missing path, a folder, or a pipe or device (``<(zcat t.csv.gz)``: read once, it could be
    neither hashed nor read again) are named as such."""
    path = Path(given)
    suffixes = ", ".join(sorted(CSV_SUFFIXES) + list(JSON_SUFFIXES))
    if not path.exists():
        raise FileNotFoundError(f"{option} {given}: the data file does not exist")
    if path.is_dir():
        raise ValueError(f"{option} {given} is a folder; give a file ({suffixes})")
    if not path.is_file():
        raise ValueError(f"{option} {given} is not a regular file (a pipe or a device); save "
                         f"the data as a file ({suffixes})")


def load_files(train_file: str, eval_file: Optional[str], text_column: str = "text",
               text_pair_column: Optional[str] = None, label_column: str = "label") -> TaskData:
    """Examples from the user's files. Labels are read as `examples.label_names_for` says
    (spellings of one label are one class; integer labels keep their value, strings are mapped
    to ids in sorted order); without ``eval_file`` a fixed tenth of the training file (at most
    1,000 rows) becomes the dev split, after rows repeating an earlier row's text are dropped
    (`_drop_repeated_texts`). An ``eval_file`` that is ``train_file``, or that repeats texts of
    it, is warned about.

    Raises:
        ValueError: besides malformed files and missing columns, a label column with more
            labels than half its rows, or dev labels that no training row has (both usually
            mean that the text and label columns are swapped).
    """
    for option, given in (("--train-file", train_file), ("--eval-file", eval_file)):
        if given is not None:
            check_data_file(option, given)
    same_data = eval_file is not None and _warn_if_same_data(train_file, eval_file)
    train_path = Path(train_file)
    texts, pairs, labels, _ = _raw_examples(train_path, text_column, text_pair_column,
                                            label_column)
    label_names = label_names_for(labels, f"{train_path}: column {label_column!r}")
    if len(label_names) < 2:
        raise ValueError(f"{train_path}: column {label_column!r} holds a single label "
                         f"{label_names}; classification needs at least two")
    if len(label_names) > len(labels) / 2:
        raise ValueError(f"{train_path}: column {label_column!r} holds {len(label_names):,} "
                         f"different labels in {len(labels):,} rows (a classifier needs several "
                         f"rows per label); {_swap_hint(train_path, label_column)}")
    index = label_index(label_names)
    train = [Example(str(t), index[label_key(y)],
                     None if p is None else str(p))
             for i, (t, p, y) in enumerate(zip(texts, pairs, labels))]
    if eval_file is None:
        train = _drop_repeated_texts(train_path, train)
        if len(train) < 2:  # (fixed_split's own error names no file)
            raise ValueError(f"{train_path}: 1 row left after dropping rows that repeat an "
                             "earlier row's text, too few to hold out an automatic dev split; "
                             "give more rows with distinct texts, or --eval-file")
        _check_labels_kept(train_path, train, label_names)
        train, dev = fixed_split(train, min(MAX_AUTO_DEV, max(1, len(train) // 10)))
        unseen = sorted({e.label for e in dev} - {e.label for e in train})
        if unseen:
            raise ValueError(f"{train_path}: the automatic dev split holds labels that no "
                             f"training row has ({[label_names[i] for i in unseen][:5]}); "
                             f"{_swap_hint(train_path, label_column)} (otherwise give more rows "
                             "of each label, or --eval-file)")
    else:
        eval_path = Path(eval_file)
        texts, pairs, labels, lines = _raw_examples(eval_path, text_column, text_pair_column,
                                                    label_column)
        unseen = next((i for i, y in enumerate(labels) if label_key(y) not in index), None)
        if unseen is not None:
            raise ValueError(f"{_place(eval_path, lines, unseen)} has label "
                             f"{str(labels[unseen]).strip()!r} (--label-column {label_column!r}), "
                             f"which no row of the training data {train_path} has (training "
                             f"labels: {label_names[:10]}); {_swap_hint(eval_path, label_column)}")
        dev = [Example(str(t), index[label_key(y)],
                       None if p is None else str(p))
               for i, (t, p, y) in enumerate(zip(texts, pairs, labels))]
        if not same_data:
            _warn_if_shared_texts(train_file, eval_file, train, dev)
    return TaskData(f"file:{train_path.name}", train, dev, label_names)
