"""The paper's comparisons as one rerunnable command: ``mor experiment isoflop``.

The MoR paper (SPEC.md section 8, Table 3) trains vanilla, recursive and Mixture-of-Recursions
models to the same training compute and compares validation NLL, unique parameters, tokens
and few-shot accuracy. This module does the same at any scale the library can run:

.. code-block:: bash

    mor experiment isoflop                                   # micro shape, 8 models, ~1 h on 2 CPU cores
    mor experiment isoflop --shapes 360m --data data/fineweb-edu --budget 16.5e18   # the paper, on a GPU
    mor experiment isoflop --models vanilla,mor-expert --nr 2,3 --kv recursion_wise,shared
    mor experiment isoflop --out runs/experiment-micro-s1 --set seed=1      # a replicate
    mor experiment combine runs/experiment-micro runs/experiment-micro-s1   # mean, spread, paired diffs

**Models.** ``--models`` is a comma list of model variants (:mod:`mor.variants`): a kind
``vanilla``, ``recursive``, ``mor-expert``, ``mor-token``, with optional modifiers appended
with ``-``: ``kvshare`` (recursive KV sharing) and a sharing scheme (``cycle``, ``sequence``,
``middle-cycle``, ``middle-sequence``; default Middle-Cycle), and optionally its N_r as
``:N`` or ``-nrN``. A kind without N_r is
crossed with every ``--nr``; a MoR kind without ``kvshare`` is crossed with every ``--kv``;
a recursive or MoR kind without a sharing modifier is crossed with every ``--sharing``.
The default list is the paper's Table 3 plus one sharing ablation (8 models)::

    vanilla, recursive N_r=2/3, MoR expert-choice N_r=2/3, MoR token-choice N_r=3,
    MoR expert-choice with KV sharing N_r=3, MoR expert-choice with Cycle sharing N_r=2

**Recipes.** Each model's training recipe is a *base recipe* (the shape) plus the model's
overrides (architecture, N_r, sharing, router, KV mode) plus the budget, the corpus and its
output directory. Shapes: ``micro`` and ``tiny`` read ``configs/experiment/<shape>.yaml``;
``135m`` and ``360m`` read ``configs/paper/vanilla-<shape>.yaml`` (the paper recipe: sequence
2048, ~2M tokens per step, AdamW 3e-3, WSD) and set every model's warm-up to 5% of the steps
of the smallest budget (min(2e18, budget)), as ``configs/paper/generate.py`` does; any other
value is a path to a YAML base recipe. Token-choice uses a softmax router with the balancing
loss (the paper's recipe). When the shape's layer count does not fit a model's sharing
scheme, layers are added (SPEC.md section 1). ``--set key=value`` (dotted for the model
section) overrides every recipe, e.g. ``--set device=cuda grad_accum=16``.

**Equal compute.** Every model trains with the trainer's ``flops_budget`` (SPEC.md section 6
counting; :func:`mor.flops.steps_for_budget`: steps = round(budget / (paper FLOPs per token x
tokens per step))). Before anything
trains, the plan checks that the rounding keeps every model's FLOPs within ``--tolerance``
(2%) of the budget and stops with the offending model otherwise.

**Corpus.** One prepared corpus for all models: ``--data DIR`` (a ``mor prepare`` output), or
``--corpus`` sources (default ``shakespeare``) prepared once into ``OUT/data``.

**Resume.** Each model runs in ``OUT/<shape>-<budget>/<model>/`` and keeps a record,
``experiment.json``, holding its exact recipe, its training segments and its summary. A model
whose record says done (same recipe, final checkpoint present) is not trained again; a model
with checkpoints from the same recipe resumes from its latest one (``train(resume=True)``);
a model whose recipe changed starts over. Rerunning the command after an interruption
therefore continues where it stopped.

**Evaluation** (:mod:`mor.experiment.evaluation`). The NLL column is the trainer's final
validation loss (top-k routing, how the paper reports it). After training, each model is also
scored on the whole validation split by :func:`mor.eval.nll.evaluate_nll`
with the causal routing rule (threshold rule for expert-choice; identical for other models),
and, for recursive and MoR models, at every test-time recursion depth 1..N_r (+1 extra pass
where the model defines it) through :func:`mor.eval.depth.forward_depth`. With
``--fewshot`` the paper's 0-shot tasks run through :mod:`mor.eval.fewshot` (needs lm-eval and
the task data). With ``--throughput`` (default on) the generation throughput of each MoR
checkpoint, paired with the vanilla one, comes from :func:`mor.bench.infer.benchmark`;
``--bench-set KEY=VALUE`` changes its settings.

**Report.** ``--report-dir`` (default ``OUT``) receives ``results.md`` (the table in the paper's
layout: model, N_r, unique params, FLOPs, tokens, NLL, accuracy), ``results.json`` and PNG
plots (matplotlib, Agg): NLL vs unique parameters and NLL vs FLOPs (with Pareto frontiers),
training/validation loss curves from every run's ``metrics.jsonl``, test-time depth scaling,
and throughput vs NLL when throughput was measured.

**Modules.** :mod:`~mor.experiment.plan` (shapes, budgets, recipes, step counts),
:mod:`~mor.experiment.records` (run records and resume), :mod:`~mor.experiment.evaluation`,
:mod:`~mor.experiment.report` (tables), :mod:`~mor.experiment.plots`,
:mod:`~mor.experiment.combine` (seed replicates) and :mod:`~mor.experiment.cli`.

**Seeds.** At small scale the seed (initialisation and batch order) moves a model's NLL by as
much as the differences being measured, so one run decides little. Replicates are the same
command with ``--set seed=N`` and their own ``--out``; ``mor experiment combine DIR DIR ...``
reads their ``results.json``, checks that they trained the same plan with different seeds,
and reports each model's NLL per seed with mean and standard deviation, and the paper's
comparisons (MoR vs vanilla, MoR vs recursive, expert vs token choice, KV sharing, N_r, sharing
scheme) as paired differences within each seed, with how many seeds agree with the sign of
the paper's Table 3 difference (``seeds.png`` plots both).
"""

from .cli import add_arguments, run

__all__ = ["add_arguments", "run"]
