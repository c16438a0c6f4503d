"""Every code block of README.md and docs/**/*.md runs, and the docs site builds with warnings as
errors.

The policy, per fenced block (each is ```python or ```bash):
- ```python: each file's blocks run in order in one namespace (a fresh one per file), in a
  temporary working directory; a failure names the file, the line where the block starts and the
  failing line.
- ```bash, one command a line (backslash continuations joined, `# comments` dropped, `cmd && cmd`
  split, `echo ... |` dropped; a leading `XLA_FLAGS=...` is allowed: the checks run with 8 CPU
  devices, as those lines ask):
  * `pip install ...`: not run (installing is CI's part); the README's test command line must be
    exactly what `.ci/run` runs, and `python -m pytest ...` (this suite) is not run again.
  * `python -m flaxattn.main ...` and `flaxattn [MODE] ...`: parsed by `flaxattn.main`'s own flags
    (absl; the experiment file loaded with its `:variant` and `--config.*` overrides), and the
    config validated by `flaxattn.config.validate` as the run would, before anything trains;
    `NAME.py:smoke` stands for every experiment with a `smoke` variant. Nothing is trained here:
    tests/test_experiments.py runs the smoke variants.
  * `python benchmarks/NAME.py ...`: parsed by the script's own `parse_args` (nothing measured).
  * any other command fails this test, so that a new kind of command gets a policy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  path: pathlib.Path
  line: int  # 1-based line of the opening fence
  language: str
  code: str

  @property
  def where(self) -> str:
    name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
    return f"{name}:{self.line}"


def code_blocks(path: pathlib.Path) -> list[Block]:
  """The fenced blocks of a Markdown file, in order."""
  blocks, language, start, lines = [], None, 0, []
  for number, text in enumerate(path.read_text().splitlines(), start=1):
    match = FENCE.match(text)
    if language is None and match:
      language, start, lines = match.group(1) or "text", number, []
    elif language is not None and text.strip() == "```":
      blocks.append(Block(path, start, language, "\n".join(lines) + "\n"))
      language = None
    elif language is not None:
      lines.append(text)
  if language is not None:
    raise AssertionError(f"{path.relative_to(ROOT)}:{start}: the ``` fence is never closed")
  return blocks


def markdown_files() -> list[pathlib.Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_fences_are_python_or_bash():
  """A fence of another language (or none) would be skipped silently: each is one of the two."""
  for path in markdown_files():
    for block in code_blocks(path):
      assert block.language in ("python", "bash"), (
          f"{block.where}: a ```{block.language} fence; tests/test_docs.py runs ```python and "
          "```bash blocks only")


# ------------------------------------------------------------------------------------------------
# python blocks


def run_python_blocks(path: pathlib.Path, directory: pathlib.Path) -> None:
  blocks = [block for block in code_blocks(path) if block.language == "python"]
  assert blocks, f"{path} has no python block"
  namespace = {"__name__": "__docs__"}
  cwd = os.getcwd()
  os.chdir(directory)
  try:
    for block in blocks:
      try:
        exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102
      except Exception as error:
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
                 if frame.filename == block.where]
        at = f" (file line {block.line + lines[-1]})" if lines else ""
        raise AssertionError(f"{block.where}: the python block starting here fails{at}: "
                             f"{type(error).__name__}: {error}") from error
  finally:
    os.chdir(cwd)


# Files whose blocks take more than ~20 s here: loading the shipped checkpoints (README: about 60 s;
# reading_attention: 16 s plus the model's load), importing Keras and its first call (about 10 s of
# numpy_to_flaxattn's 22 s).
SLOW_FILES = {"README.md", "docs/tutorials/reading_attention.md",
              "docs/tutorials/numpy_to_flaxattn.md"}
PYTHON_FILES = [path for path in markdown_files()
                if any(block.language == "python" for block in code_blocks(path))]


def _param(path: pathlib.Path):
  name = str(path.relative_to(ROOT))
  return pytest.param(path, marks=[pytest.mark.slow] if name in SLOW_FILES else [], id=name)


# Pages whose blocks run in a fresh pytest process: the training tutorial's jitted step on the
# 8-device CPU mesh aborted the whole xdist worker ("Fatal Python error: Aborted", inside XLA's CPU
# runtime) in 3 of about 8 full-suite runs, never when run alone; a fresh process keeps the other
# tests' state (threads, compiled programs) away from it, and one abort (SIGABRT) is retried once.
ISOLATED_FILES = {"docs/tutorials/training_from_python.md"}
_CHILD = "FLAXATTN_DOCS_CHILD"


def _run_isolated(path: pathlib.Path) -> None:
  test_id = f"{pathlib.Path(__file__).name}::test_python_blocks_run[{path.relative_to(ROOT)}]"
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
             test_id]
  env = {**os.environ, _CHILD: "1"}
  for attempt in range(2):
    result = subprocess.run(command, cwd=pathlib.Path(__file__).parent, env=env, text=True,
                            capture_output=True, timeout=900)
    if result.returncode not in (-6, 134) or attempt:  # -6 / 134: SIGABRT.
      break
  assert result.returncode == 0, f"{test_id} (fresh process) failed:\n{result.stdout[-6000:]}"


@pytest.mark.parametrize("path", [_param(path) for path in PYTHON_FILES])
def test_python_blocks_run(path, tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_BACKEND", "jax")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  if str(path.relative_to(ROOT)) in ISOLATED_FILES and not os.environ.get(_CHILD):
    _run_isolated(path)
  else:
    run_python_blocks(path, tmp_path)


def test_a_failing_block_names_file_and_line(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("text\n\n```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is 1'\n```\n")
  with pytest.raises(AssertionError, match=r"page.md:7: the python block starting here fails "
                                           r"\(file line 8\): AssertionError: x is 1"):
    run_python_blocks(page, tmp_path)


# ------------------------------------------------------------------------------------------------
# bash blocks


def bash_commands(block: Block) -> list[tuple[str, dict[str, str], list[str]]]:
  """`(line, environment, argv)` of each command of a bash block (see the module docstring)."""
  commands, pending = [], ""
  for text in block.code.splitlines():
    pending += text
    if pending.endswith("\\"):
      pending = pending[:-1] + " "
      continue
    line, pending = pending.strip(), ""
    words = shlex.split(line, comments=True)
    if not words:
      continue
    line = " ".join(words)
    if "|" in words:  # `echo TEXT | command`: the command's input is not what is checked.
      words = words[words.index("|") + 1:]
    parts = [[]]
    for word in words:
      parts.append([]) if word == "&&" else parts[-1].append(word)
    for argv in parts:
      environment = {}
      while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
        name, value = argv.pop(0).split("=", 1)
        environment[name] = value
      commands.append((line, environment, argv))
  return commands


def ci_command() -> str:
  """The command line `.ci/run` runs (its last line)."""
  return (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()


def test_readme_test_command_is_what_ci_runs():
  readme = code_blocks(ROOT / "README.md")
  lines = [text.split("#")[0].strip() for block in readme if block.language == "bash"
           for text in block.code.splitlines() if "python -m pytest -q" in text]
  assert lines and lines[0] == ci_command(), (lines, ci_command())


def classify(argv: list[str]) -> str:
  if argv[:2] == ["pip", "install"]:
    return "install"
  if argv[:3] == ["python", "-m", "pytest"]:
    return "suite"
  if argv[:3] == ["python", "-m", "flaxattn.main"] or argv[:1] == ["flaxattn"]:
    return "flaxattn"
  if argv[:1] == ["python"] and len(argv) > 1 and argv[1].startswith("benchmarks/"):
    return "benchmark"
  return "unknown"


def all_bash_commands() -> list[tuple[str, dict, list[str]]]:
  return [(f"{block.where}: {line}", environment, argv)
          for path in markdown_files() for block in code_blocks(path) if block.language == "bash"
          for line, environment, argv in bash_commands(block)]


def test_every_bash_command_has_a_policy():
  unknown = [where for where, _, argv in all_bash_commands() if classify(argv) == "unknown"]
  assert not unknown, f"commands with no policy in tests/test_docs.py: {unknown}"


def test_bash_block_parsing():
  block = Block(ROOT / "x.md", 1, "bash", 'A=1 B=x \\\n  flaxattn eval --workdir=w  # note\n'
                'pip install -e ".[dev]" && python -m pytest -q\necho "a b" | flaxattn decode '
                '--workdir=w\n')
  assert [(environment, argv) for _, environment, argv in bash_commands(block)] == [
      ({"A": "1", "B": "x"}, ["flaxattn", "eval", "--workdir=w"]),
      ({}, ["pip", "install", "-e", ".[dev]"]), ({}, ["python", "-m", "pytest", "-q"]),
      ({}, ["flaxattn", "decode", "--workdir=w"])]


def experiments_with(variant: str) -> list[str]:
  """The experiment files whose VARIANTS include `variant`."""
  found = []
  for path in sorted((ROOT / "experiments").glob("*.py")):
    if re.search(rf"""["']{variant}["']""", path.read_text()):
      found.append(f"experiments/{path.name}")
  return found


# Run in a fresh interpreter: absl's global flags and the experiment configs stay out of this one.
# Reads a JSON list of [where, argv] from stdin; prints one JSON result per command.
CHECK_COMMANDS = r"""
import json, os, sys
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax
jax.config.update("jax_platforms", "cpu")
from absl import flags
import flaxattn.main as main
from flaxattn.config import validate
results = []
for where, argv in json.load(sys.stdin):
  try:
    argv = list(argv)
    if argv[0] == "flaxattn":
      mode = len(argv) > 1 and argv[1] in main.MODES
      argv = ["flaxattn"] + ([f"--mode={argv[1]}"] + argv[2:] if mode else argv[1:])
    else:
      argv = ["flaxattn"] + argv[3:]
    flags.FLAGS.unparse_flags()
    sys.argv = argv  # ml_collections' config flag reads its --config.* overrides from sys.argv.
    flags.FLAGS(argv)
    if flags.FLAGS.mode == "train":
      if flags.FLAGS.config is None:
        raise ValueError("a training command needs --config")
      validate(flags.FLAGS.config)
    elif flags.FLAGS.config is not None:
      validate(flags.FLAGS.config)
    results.append([where, None])
  except BaseException as error:
    results.append([where, f"{type(error).__name__}: {error}"])
print(json.dumps(results))
"""


def test_flaxattn_commands_parse_and_validate():
  """Every `python -m flaxattn.main` / `flaxattn MODE` line: its flags parse and its config
  validates (NAME.py:smoke: every experiment with a smoke variant)."""
  commands = []
  for where, environment, argv in all_bash_commands():
    if classify(argv) != "flaxattn":
      continue
    assert set(environment) <= {"XLA_FLAGS"}, f"{where}: unexpected environment {environment}"
    if any("experiments/NAME.py" in word for word in argv):
      smoke = experiments_with("smoke")
      assert smoke, "no experiment has a smoke variant"
      commands += [[f"{where} [{name}]", [word.replace("experiments/NAME.py", name)
                                           for word in argv]] for name in smoke]
    else:
      commands.append([where, argv])
  assert len(commands) > 10
  started = time.monotonic()
  done = subprocess.run([sys.executable, "-c", CHECK_COMMANDS], input=json.dumps(commands),
                        capture_output=True, text=True, cwd=ROOT, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert done.returncode == 0, done.stderr[-3000:]
  failures = [f"{where}: {error}" for where, error in json.loads(done.stdout.splitlines()[-1])
              if error is not None]
  assert not failures, "\n".join(failures)
  assert time.monotonic() - started < 120


def test_benchmark_commands_parse():
  import importlib.util
  for where, _, argv in all_bash_commands():
    if classify(argv) != "benchmark":
      continue
    spec = importlib.util.spec_from_file_location("docs_benchmark", ROOT / argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
      module.parse_args(argv[2:])
    except SystemExit as error:
      raise AssertionError(f"{where}: its flags do not parse (exit {error.code})") from None


# ------------------------------------------------------------------------------------------------
# the site


def test_docs_site_builds_strict(tmp_path):
  """`mkdocs build --strict`: a broken link, a missing page or a docstring that mkdocstrings cannot
  read fails the build."""
  import importlib.util
  if importlib.util.find_spec("mkdocs") is None:
    if os.environ.get("CI"):  # CI installs the dev extra, which brings the docs extra.
      pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
    pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
  done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                         str(tmp_path / "site")],
                        capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
  assert done.returncode == 0, done.stderr[-5000:]
  api = (tmp_path / "site" / "api" / "attention" / "index.html").read_text()
  assert 'id="flaxattn.attention.dot_product_attention"' in api
