"""Evaluation and analysis of trained checkpoints.

* :mod:`mor.eval.nll` - validation NLL / perplexity on held-out text, for both expert-choice
  routing modes (training-time top-k and the causal threshold rule), with router diagnostics;
* :mod:`mor.eval.scoring` - batched token scoring (log-likelihoods, rolling log-likelihoods,
  greedy generation) independent of lm-eval;
* :mod:`mor.eval.lm_eval_adapter` - the lm-eval model ``mor`` built on the scorer
  (imports ``lm_eval``; use ``python -m mor.eval.lm_eval_cli`` for lm-eval's own CLI);
* :mod:`mor.eval.tasks` - offline task YAMLs for the paper's six few-shot benchmarks;
* :mod:`mor.eval.fewshot` - runs those tasks and builds the paper's table;
* :mod:`mor.eval.depth` - a forward pass that caps or extends the recursion depth and
  records every router decision (test-time depth scaling, router histograms);
* :mod:`mor.eval.analyze` - ``mor analyze``: depth maps (HTML/PNG), histograms, scaling;
* :mod:`mor.eval.cli` - ``mor eval``.

Results are merged into ``results.json`` inside the checkpoint directory
(:func:`mor.eval.common.update_results`). See docs/evaluation.md.
"""

from .common import load_for_eval, update_results
from .nll import evaluate_nll, token_stream

__all__ = ["load_for_eval", "update_results", "evaluate_nll", "token_stream"]
