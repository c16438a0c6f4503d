"""Config validation: each invalid case names the key and the value; the CLI reports it."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

import flaxattn.attention
from flaxattn.config import base_config, load_experiment, parse_variant, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments import lm_tiny  # noqa: E402  (the experiment file, as flaxattn.main loads it)


def tiny():
  config = base_config()
  config.model.update(vocab_size=64, d_model=32, num_heads=4, mlp_dim=64, num_layers=1,
                      max_length=32)
  config.data.seq_len = 32
  config.batch_size = 8
  return config


def seq2seq(config, source_len=16, target_len=16):
  """`config` as a seq2seq run (copy task) with these lengths; `data.seq_len` far over max_length."""
  config.task = "seq2seq"
  config.data.update(name="copy", source_len=source_len, target_len=target_len, seq_len=1000,
                     vocab_size=20)
  return config


def test_seq2seq_lengths_that_fit_are_valid_whatever_data_seq_len():
  validate(seq2seq(tiny()))


@pytest.mark.parametrize("variant", ["sharded", "ring"])
def test_lm_tiny_mesh_variants_are_valid_on_8_devices(variant):
  validate(lm_tiny.get_config(variant))


def test_valid_configs_pass():
  validate(base_config())
  validate(tiny())
  ring = tiny()
  ring.mesh.update(data=2, context=4)
  ring.sharding.preset = "context"
  ring.model.attention_impl = "ring"
  validate(ring)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.model.update(num_heads=6, kv_heads=4),
     r"config.model.num_heads=6 must be divisible by config.model.kv_heads=4"),
    (lambda c: c.model.update(d_model=30),
     r"config.model: TransformerConfig.d_model \(30\) must be divisible by num_heads \(4\)"),
    (lambda c: c.mesh.update(data=3), r"config.mesh .* needs 3 devices, but there are 8"),
    (lambda c: c.update(batch_size=12), r"config.batch_size=12 must be divisible by the 8 batch shards"),
    (lambda c: c.update(steps=0), "config.steps must be positive, got 0"),
    (lambda c: c.optimizer.update(name="adam"), r"config.optimizer.name must be one of .* got 'adam'"),
    (lambda c: (c.mesh.update(data=2, tensor=4), c.sharding.update(preset="dp")),
     r"config.mesh.tensor=4 but config.sharding.preset='dp' .* maps nothing to it"),
    (lambda c: (c.mesh.update(data=2, context=4), c.sharding.update(preset="context"),
                c.data.update(seq_len=30), c.model.update(positions="rope")),
     r"config.data.seq_len=30 must be divisible by the 4 sequence"),
    (lambda c: c.data.update(seq_len=64), r"config.data.seq_len=64 exceeds config.model.max_length=32"),
    (lambda c: c.model.update(attention_impl="ring"),
     r"attention_impl='ring' needs config.mesh.context > 1 .*got 1"),
    # The context axis used for the batch instead of the sequence.
    (lambda c: (c.mesh.update(data=2, context=4),
                c.sharding.update(preset="context", overrides="length=,batch=data+context"),
                c.model.update(attention_impl="ring")),
     r"attention_impl='ring' needs the sequence sharded over the context axis.*maps 'length' to \(\)"),
    (lambda c: (c.mesh.update(data=2, context=4), c.sharding.update(preset="context"),
                c.data.update(seq_len=28), c.model.update(attention_impl="ring")),
     r"config.data.seq_len=28 must be divisible by 2 x config.mesh.context=4"),
    (lambda c: c.sharding.update(overrides="hidden=tensor"), r"config.sharding.overrides: 'hidden=tensor'"),
    # seq2seq: the source and the target each against the learned positions, not data.seq_len.
    (lambda c: seq2seq(c, source_len=40), r"config.data.source_len=40 exceeds config.model.max_length=32"),
    (lambda c: seq2seq(c, target_len=40), r"config.data.target_len=40 exceeds config.model.max_length=32"),
    (lambda c: seq2seq(c, target_len=32),
     r"config.eval.max_decode_len=None \(None = data.target_len=32\) plus the start token needs a "
     r"cache of 33 positions, over config.model.max_length=32"),
    (lambda c: (seq2seq(c, source_len=30), c.mesh.update(data=2, context=4),
                c.sharding.update(preset="context")),
     r"config.data.source_len=30 must be divisible by the 4 sequence"),
    (lambda c: (seq2seq(c), c.mesh.update(data=2, context=4), c.sharding.update(preset="context"),
                c.model.update(attention_impl="ring")),
     r"config.model.attention_impl='ring' cannot run seq2seq: .* leave config.model.attention_impl "
     r"unset \(None\) for seq2seq"),
])
def test_invalid_values_name_key_and_value(change, message):
  config = tiny()
  change(config)
  with pytest.raises(ValueError, match=message):
    validate(config)


@pytest.mark.parametrize("path, value, message", [
    (("stepz",), 3, r"config.stepz is not a known config key; did you mean config.steps\?"),
    (("model", "num_layer"), 2, r"config.model.num_layer .* did you mean config.model.num_layers\?"),
    (("optimizer",), 0.1, "config.optimizer must be a ConfigDict section, got 0.1"),
    (("steps",), "100", r"config.steps must be int, got str '100'"),
    (("model", "scan_layers"), 1, r"config.model.scan_layers must be bool, got int 1"),
    (("model", "kv_heads"), 2.0, r"config.model.kv_heads must be int, got float 2.0"),
])
def test_unknown_keys_and_wrong_types(path, value, message):
  # A config file may build its ConfigDict from a plain dict, which no type check guards.
  values = tiny().to_dict()
  section = values
  for key in path[:-1]:
    section = section[key]
  section[path[-1]] = value
  with pytest.raises(ValueError, match=message):
    validate(ml_collections.ConfigDict(values))
  validate(ml_collections.ConfigDict(tiny().to_dict()))


def test_attention_implementation_unavailable_here(monkeypatch):
  described = flaxattn.attention.describe_implementations()
  fake = dict(described[0], name="gpu_only", platforms=["gpu"])
  monkeypatch.setattr(flaxattn.attention, "describe_implementations", lambda: described + [fake])
  monkeypatch.setattr(flaxattn.attention, "implementations",
                      lambda platform=None: tuple(d["name"] for d in described + [fake]))
  config = tiny()
  config.model.attention_impl = "gpu_only"
  with pytest.raises(ValueError, match=r"attention_impl='gpu_only' cannot run on platform 'cpu'"):
    validate(config)
  config.model.attention_impl = "fastest"
  with pytest.raises(ValueError, match="attention_impl must be None or one of"):
    validate(config)


def test_main_reports_config_errors():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "flaxattn.main", "--config=experiments/lm_tiny.py",
             "--workdir=/nonexistent/never_created"]
  result = subprocess.run(command + ["--config.model.num_heads=3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "config.model.num_heads=3 must be divisible by config.model.kv_heads=2" in result.stderr
  result = subprocess.run(command[:3] + ["--config=experiments/lm_tiny.py:huge", command[4]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "variant must be one of" in result.stderr
  # Overrides of unknown keys: one line naming the key, with a suggestion (tests/test_cli.py).
  result = subprocess.run(command + ["--config.model.num_layerz=3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "did you mean num_layers?" in result.stderr
  assert "Traceback" not in result.stderr


def _experiment_variants():
  for path in sorted(pathlib.Path(REPO, "experiments").glob("*.py")):
    for variant in load_experiment(str(path)).VARIANTS:
      yield path.name, variant


@pytest.mark.parametrize("name, variant", list(_experiment_variants()))
def test_every_experiment_variant_builds_and_validates(name, variant):
  module = load_experiment(os.path.join(REPO, "experiments", name))
  validate(module.get_config(variant))


def test_parse_variant_types_options_from_their_defaults():
  parse = lambda arg: parse_variant(arg, "/x/experiments/demo.py", ("", "small"), steps=10,
                                    rate=0.5, name="a", packed=False)
  assert parse(None).to_dict() == dict(variant="", steps=10, rate=0.5, name="a", packed=False)
  assert parse("small,steps=3,rate=2,name=b,packed").to_dict() == dict(
      variant="small", steps=3, rate=2.0, name="b", packed=True)
  assert parse("packed=false,steps=4").to_dict() == dict(
      variant="", steps=4, rate=0.5, name="a", packed=False)
  for arg, message in [
      ("huge", r"^experiments/demo.py variant must be one of \('', 'small'\), got 'huge'$"),
      ("small,step=3", r"^experiments/demo.py: 'step' is not an option; the options are "
                       r"\['name', 'packed', 'rate', 'steps'\] \(variants \('', 'small'\)\)$"),
      ("steps=many", r"^experiments/demo.py: option steps='many' must be int$"),
      ("packed=yes", r"^experiments/demo.py: option packed='yes' must be bool$")]:
    with pytest.raises(ValueError, match=message):
      parse(arg)


def test_sequence_tasks_length_option_sets_the_lengths():
  module = load_experiment(os.path.join(REPO, "experiments", "sequence_tasks.py"))
  config = module.get_config("copy,length=20")
  assert (config.data.name, config.data.min_length, config.data.source_len,
          config.model.max_length) == ("copy", 20, 24, 48)
  assert module.get_config("recall").data.min_length == 11  # Pairs then a query: odd.
  validate(config)
