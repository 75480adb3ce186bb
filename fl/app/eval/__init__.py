"""fl-eval: score exported adapters and base models with EleutherAI's lm-evaluation-harness (the `eval` extra).

`cli` is the command, `harness` builds the model and calls lm-eval, `records` turns a run's held-out records into
the shipped tasks' data, `track` adds the scores to the run's tracking backend. See docs/eval.md.
"""
