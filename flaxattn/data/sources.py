"""Records from files (TSV, CSV, JSON Lines, plain text), Hugging Face `datasets` and TFDS.

A bad line (empty, not UTF-8, malformed JSON, wrong column count, missing a required field) is never
dropped silently: `on_bad_line='error'` raises a `DataError` naming the file, the 1-based line number and
the reason; `on_bad_line='skip'` leaves it out but records it in the `SourceReport` (count per reason and
every line number), whose summary is logged.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import json
import logging
import pathlib
from collections.abc import Iterator, Sequence

FORMATS = ("tsv", "csv", "jsonl", "txt")
ON_BAD_LINE = ("error", "skip")

# Reasons a line is bad (the keys of `SourceReport.skipped`).
EMPTY = "empty line"
NOT_UTF8 = "not UTF-8"
MALFORMED_JSON = "malformed JSON"
NOT_AN_OBJECT = "JSON value is not an object"
WRONG_COLUMNS = "wrong column count"
MALFORMED_CSV = "malformed CSV"
MISSING_FIELDS = "missing fields"

_LOCATIONS_IN_SUMMARY = 10  # The summary is one log line; `locations` keeps every line number.

logger = logging.getLogger(__name__)


class DataError(ValueError):
  """A data file that cannot be read as asked: names the file, the line and the reason."""


@dataclasses.dataclass
class SourceReport:
  """What `read_records` read from one file and what it skipped.

  Attributes:
    path: the file.
    format: 'tsv', 'csv', 'jsonl' or 'txt'.
    lines: physical lines read (a header included).
    records: records returned.
    skipped: reason -> number of lines skipped for it.
    locations: reason -> every 1-based line number skipped for it, in file order.
  """
  path: str
  format: str
  lines: int = 0
  records: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  locations: dict[str, list[int]] = dataclasses.field(default_factory=dict)

  @property
  def total_bad(self) -> int:
    """Lines skipped, all reasons together."""
    return sum(self.skipped.values())

  def add(self, reason: str, line: int) -> None:
    self.skipped[reason] += 1
    self.locations.setdefault(reason, []).append(line)

  def summary(self) -> str:
    """One line: records kept of lines read, and per reason the count and the first line numbers."""
    text = f"{self.path} ({self.format}): {self.records} records from {self.lines} lines"
    if not self.skipped:
      return text + ", nothing skipped"
    parts = []
    for reason, count in sorted(self.skipped.items()):
      lines = self.locations[reason]
      shown = ", ".join(map(str, lines[:_LOCATIONS_IN_SUMMARY]))
      more = f" and {len(lines) - _LOCATIONS_IN_SUMMARY} more" if len(lines) > _LOCATIONS_IN_SUMMARY else ""
      parts.append(f"{reason}: {count} (line{'s' if count > 1 else ''} {shown}{more})")
    return f"{text}; skipped {self.total_bad}: " + "; ".join(parts)


def _format_of(path: pathlib.Path, format: str | None) -> str:  # pylint: disable=redefined-builtin
  if format is None:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
      suffixes.pop()
    format = suffixes[-1][1:] if suffixes else ""
    if format not in FORMATS:
      raise ValueError(f"cannot tell the format of {str(path)!r} from its extension; name it with "
                       f"format= one of {FORMATS}")
  elif format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  return format


def _physical_lines(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
  """(1-based number, bytes without the line ending) of each line; `.gz` files are decompressed."""
  opener = gzip.open if path.suffix.lower() == ".gz" else open
  with opener(path, "rb") as file:
    for number, line in enumerate(file, start=1):
      if line.endswith(b"\n"):
        line = line[:-1]
      if line.endswith(b"\r"):
        line = line[:-1]
      if number == 1 and line.startswith(b"\xef\xbb\xbf"):  # A UTF-8 byte-order mark.
        line = line[3:]
      yield number, line


def read_records(path, *, format: str | None = None, fields: Sequence[str] | None = None,  # pylint: disable=redefined-builtin
                 on_bad_line: str = "error") -> tuple[list[dict], SourceReport]:
  """Reads a file of records.

  Args:
    path: a `.tsv`, `.csv`, `.jsonl` or `.txt` file (optionally `.gz`-compressed).
    format: 'tsv', 'csv', 'jsonl' or 'txt'; None: from the extension.
      csv/tsv: the first line is the header naming the columns; values are strings. csv follows
      RFC 4180 quoting (a quoted field may span lines); tsv has no quoting: one line, one record.
      jsonl: one JSON object a line. txt: each line is `{'text': line}`.
    fields: keys every record must have (csv/tsv: header columns, checked once up front).
    on_bad_line: 'error' raises `DataError` at the first bad line; 'skip' leaves bad lines out and
      records each in the report (logged as a warning).

  Returns:
    `(records, report)`: the records in file order (dicts), and the `SourceReport`.

  Raises:
    DataError: a bad line with `on_bad_line='error'`; a csv/tsv file without a header or whose header
      lacks a field of `fields`.
  """
  path = pathlib.Path(path)
  format = _format_of(path, format)
  if on_bad_line not in ON_BAD_LINE:
    raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
  if not path.is_file():
    raise FileNotFoundError(f"no data file at {str(path)!r}")
  required = list(fields or ())
  if format == "txt" and set(required) - {"text"}:
    raise ValueError(f"a txt file's records have the single field 'text', got fields={required!r}")
  report = SourceReport(path=str(path), format=format)

  def bad(reason: str, line: int, detail: str = "") -> None:
    if on_bad_line == "error":
      raise DataError(f"{path}:{line}: {reason}{': ' + detail if detail else ''}")
    report.add(reason, line)

  def decoded_lines() -> Iterator[tuple[int, str]]:
    for number, raw in _physical_lines(path):
      report.lines = number
      try:
        yield number, raw.decode("utf-8")
      except UnicodeDecodeError as error:
        bad(NOT_UTF8, number, str(error))

  records = []
  if format in ("txt", "jsonl"):
    for number, line in decoded_lines():
      if not line.strip():
        bad(EMPTY, number)
        continue
      if format == "txt":
        record = {"text": line}
      else:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          bad(MALFORMED_JSON, number, str(error))
          continue
        if not isinstance(record, dict):
          bad(NOT_AN_OBJECT, number, f"got {type(record).__name__}")
          continue
      missing = [name for name in required if name not in record]
      if missing:
        bad(MISSING_FIELDS, number, f"lacks {missing}")
        continue
      records.append(record)
  else:
    records = _read_table(path, format, decoded_lines(), required, bad)
  report.records = len(records)
  if report.skipped:
    logger.warning("%s", report.summary())
  else:
    logger.info("%s", report.summary())
  return records, report


def _read_table(path, format, lines, required, bad) -> list[dict]:  # pylint: disable=redefined-builtin
  """csv/tsv rows as dicts keyed by the header; see `read_records`."""
  # The csv reader pulls lines from this generator; `numbers` maps what it consumed back to the
  # physical line numbers (undecodable lines never reach it), so a record spanning lines reports the
  # line it starts on.
  numbers = []

  def feed():
    for number, text in lines:
      numbers.append(number)
      yield text + "\n"  # The line ending belongs to a quoted field that spans lines.

  dialect = ({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if format == "tsv" else {})
  reader = csv.reader(feed(), strict=True, **dialect)
  header, records = None, []
  while True:
    consumed = reader.line_num
    try:
      row = next(reader)
    except StopIteration:
      break
    except csv.Error as error:
      bad(MALFORMED_CSV, numbers[consumed] if consumed < len(numbers) else len(numbers), str(error))
      continue
    number = numbers[consumed]
    if not row or (len(row) == 1 and not row[0].strip()):
      bad(EMPTY, number)
      continue
    if header is None:
      header = row
      duplicated = sorted({name for name in header if header.count(name) > 1})
      if duplicated:
        raise DataError(f"{path}:{number}: header repeats the columns {duplicated}")
      missing = [name for name in required if name not in header]
      if missing:
        raise DataError(f"{path}:{number}: header {header} lacks the required fields {missing}")
      continue
    if len(row) != len(header):
      bad(WRONG_COLUMNS, number, f"expected {len(header)} (the header's), got {len(row)}")
      continue
    records.append(dict(zip(header, row)))
  if header is None:
    raise DataError(f"{path}: no header row (the file has no non-empty line)")
  return records


def load_hf_dataset(path, split: str | None = None):
  """A Hugging Face dataset saved with `save_to_disk`, as a random-access sequence of dicts.

  Args:
    path: the directory `save_to_disk` wrote.
    split: which split of a saved `DatasetDict` ('train', ...); None for a saved single `Dataset`.

  Returns:
    A `datasets.Dataset` (`len()` and `[index]` -> dict), usable directly by `pipeline.make_dataset`
    once its examples are tokenised.
  """
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("load_hf_dataset needs the Hugging Face `datasets` package: "
                      "pip install datasets") from error
  loaded = datasets.load_from_disk(str(path))
  if isinstance(loaded, datasets.DatasetDict):
    if split is None or split not in loaded:
      raise ValueError(f"{str(path)!r} holds the splits {sorted(loaded)}; pick one with split=, "
                       f"got split={split!r}")
    return loaded[split]
  if split is not None:
    raise ValueError(f"{str(path)!r} holds a single dataset without splits, got split={split!r}")
  return loaded


def load_tfds(name: str, *, split: str, data_dir):
  """A prepared TFDS dataset as a random-access data source (no download: it must be in `data_dir`).

  Args:
    name: the TFDS name, optionally with config and version (`'imdb_reviews/plain_text:1.0.0'`).
    split: the split, with TFDS slicing (`'train[:90%]'`).
    data_dir: the TFDS data directory holding the prepared dataset (array_record format).

  Returns:
    TFDS's random-access data source (`len()` and `[index]` -> dict of NumPy values).
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("load_tfds needs TensorFlow Datasets: pip install tensorflow-datasets "
                      "array_record") from error
  return tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
