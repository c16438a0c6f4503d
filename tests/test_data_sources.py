"""File sources: every format, every kind of bad line (error and skip), and the optional loaders."""

import gzip
import json
import logging
import sys
import types

import pytest

from flaxattn.data import sources


def write(path, data: bytes):
  path.write_bytes(data)
  return path


def test_tsv_csv_jsonl_txt_read(tmp_path):
  tsv = write(tmp_path / "a.tsv", b'text\tlabel\nhello "world\t1\r\nbye\t0\n')
  records, report = sources.read_records(tsv, fields=["text", "label"])
  assert records == [{"text": 'hello "world', "label": "1"}, {"text": "bye", "label": "0"}]
  assert (report.lines, report.records, report.total_bad) == (3, 2, 0)
  assert report.summary().endswith("2 records from 3 lines, nothing skipped")

  csv_file = write(tmp_path / "a.csv", '\ufeffid,text\n1,"two\nlines, quoted"\n2,plain\n'.encode())
  records, _ = sources.read_records(csv_file)
  assert records == [{"id": "1", "text": "two\nlines, quoted"}, {"id": "2", "text": "plain"}]

  jsonl = write(tmp_path / "a.jsonl", b'{"source": "a", "target": "b"}\n{"source": "\\u00e9", "target": 1}\n')
  records, _ = sources.read_records(jsonl, fields=["source"])
  assert records == [{"source": "a", "target": "b"}, {"source": "é", "target": 1}]

  txt = write(tmp_path / "data.bin", "first line\n  second  \n".encode())
  records, _ = sources.read_records(txt, format="txt")
  assert records == [{"text": "first line"}, {"text": "  second  "}]

  with gzip.open(tmp_path / "b.txt.gz", "wb") as file:
    file.write(b"zipped\n")
  assert sources.read_records(tmp_path / "b.txt.gz")[0] == [{"text": "zipped"}]


# One file per format with a bad line of each kind it can have: (name, content, reason, 1-based line).
BAD_LINES = [
    ("empty.txt", b"a\n\nb\n", sources.EMPTY, 2),
    ("blank.jsonl", b'{"a": 1}\n   \n', sources.EMPTY, 2),
    ("bytes.txt", b"ok\n\xff\xfe bad\nok\n", sources.NOT_UTF8, 2),
    ("bytes.tsv", b"x\ty\n1\t2\n\xc3(\t3\n", sources.NOT_UTF8, 3),
    ("json.jsonl", b'{"a": 1}\n{"a": 2\n', sources.MALFORMED_JSON, 2),
    ("list.jsonl", b'{"a": 1}\n[1, 2]\n', sources.NOT_AN_OBJECT, 2),
    ("columns.tsv", b"x\ty\n1\t2\n1\t2\t3\n4\t5\n", sources.WRONG_COLUMNS, 3),
    ("columns.csv", b'x,y\n"multi\nline",2\n1\n', sources.WRONG_COLUMNS, 4),
    ("quote.csv", b'x,y\n1,2\n"a"b,2\n3,4\n', sources.MALFORMED_CSV, 3),
    ("fields.jsonl", b'{"a": 1, "b": 2}\n{"a": 3}\n', sources.MISSING_FIELDS, 2),
]


@pytest.mark.parametrize("name, content, reason, line", BAD_LINES, ids=[row[0] for row in BAD_LINES])
def test_bad_line_raises_with_file_line_and_reason(tmp_path, name, content, reason, line):
  path = write(tmp_path / name, content)
  fields = ["a", "b"] if name == "fields.jsonl" else None
  with pytest.raises(sources.DataError, match=f"{name}:{line}: {reason}") as raised:
    sources.read_records(path, fields=fields)
  assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("name, content, reason, line", BAD_LINES, ids=[row[0] for row in BAD_LINES])
def test_bad_line_skipped_is_reported(tmp_path, caplog, name, content, reason, line):
  path = write(tmp_path / name, content)
  fields = ["a", "b"] if name == "fields.jsonl" else None
  with caplog.at_level(logging.WARNING, logger=sources.__name__):
    records, report = sources.read_records(path, fields=fields, on_bad_line="skip")
  assert report.skipped == {reason: 1} and report.locations == {reason: [line]}
  # Every line is a record, the header, or skipped (the multi-line csv record spans two lines).
  header = name.endswith((".tsv", ".csv"))
  spanning = 1 if name == "columns.csv" else 0
  assert report.records == len(records) == report.lines - header - spanning - 1
  assert f"{reason}: 1 (line {line})" in report.summary()
  assert report.summary() in caplog.text


def test_summary_lists_reasons_and_shortens_long_location_lists(tmp_path):
  content = b"x\ty\n" + b"\n" * 12 + b"1\t2\t3\n" + b"4\t5\n"
  _, report = sources.read_records(write(tmp_path / "many.tsv", content), on_bad_line="skip")
  assert report.skipped == {sources.EMPTY: 12, sources.WRONG_COLUMNS: 1}
  assert report.locations[sources.EMPTY] == list(range(2, 14)), "every location is kept"
  summary = report.summary()
  assert "empty line: 12 (lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 2 more)" in summary
  assert "wrong column count: 1 (line 14)" in summary and "skipped 13" in summary


def test_header_and_argument_errors(tmp_path):
  tsv = write(tmp_path / "h.tsv", b"text\tlabel\na\t1\n")
  with pytest.raises(sources.DataError, match=r"h.tsv:1: header \['text', 'label'\] lacks the required fields \['id'\]"):
    sources.read_records(tsv, fields=["id"])
  with pytest.raises(sources.DataError, match="repeats the columns"):
    sources.read_records(write(tmp_path / "d.csv", b"a,a\n1,2\n"))
  with pytest.raises(sources.DataError, match="no header row"):
    sources.read_records(write(tmp_path / "e.csv", b"\n\n"), on_bad_line="skip")
  with pytest.raises(ValueError, match="cannot tell the format of .*data.parquet"):
    sources.read_records(write(tmp_path / "data.parquet", b""))
  with pytest.raises(ValueError, match="format must be one of .* got 'xml'"):
    sources.read_records(tsv, format="xml")
  with pytest.raises(ValueError, match="on_bad_line must be one of .* got 'ignore'"):
    sources.read_records(tsv, on_bad_line="ignore")
  with pytest.raises(ValueError, match=r"single field 'text', got fields=\['label'\]"):
    sources.read_records(write(tmp_path / "t.txt", b"a\n"), fields=["label"])
  with pytest.raises(FileNotFoundError, match="no data file at"):
    sources.read_records(tmp_path / "missing.tsv")


def test_optional_loaders_name_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)   # None in sys.modules makes the import fail.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install datasets"):
    sources.load_hf_dataset("/nowhere")
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    sources.load_tfds("mnist", split="train", data_dir="/nowhere")


def test_load_hf_dataset_picks_splits(monkeypatch):
  class DatasetDict(dict):
    pass

  saved = {"/dict": DatasetDict(train=["train rows"], test=["test rows"]), "/single": ["rows"]}
  fake = types.SimpleNamespace(DatasetDict=DatasetDict, load_from_disk=saved.__getitem__)
  monkeypatch.setitem(sys.modules, "datasets", fake)
  assert sources.load_hf_dataset("/dict", split="test") == ["test rows"]
  assert sources.load_hf_dataset("/single") == ["rows"]
  with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\]; pick one with split=, got split=None"):
    sources.load_hf_dataset("/dict")
  with pytest.raises(ValueError, match="got split='validation'"):
    sources.load_hf_dataset("/dict", split="validation")
  with pytest.raises(ValueError, match="single dataset without splits"):
    sources.load_hf_dataset("/single", split="train")


def test_load_tfds_reads_without_download(monkeypatch):
  calls = []
  fake = types.SimpleNamespace(data_source=lambda name, **kwargs: calls.append((name, kwargs)) or [{"x": 1}])
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  assert sources.load_tfds("imdb_reviews", split="train[:10%]", data_dir="/data") == [{"x": 1}]
  assert calls == [("imdb_reviews", {"split": "train[:10%]", "data_dir": "/data", "download": False})]
  assert json.dumps(calls)  # plain values only
