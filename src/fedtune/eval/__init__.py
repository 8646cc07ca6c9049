"""fedtune's evaluation suite: HumanEval, GSM8K, MMLU, HELM-MINI and held-out loss, offline.

* :mod:`fedtune.eval.engine` — batched generation and log-likelihood scoring (the two loops);
* :mod:`fedtune.eval.tasks` — one file per task behind one interface, registered by name;
* :mod:`fedtune.eval.sandbox` — generated code runs in limited, killable processes;
* :mod:`fedtune.eval.targets` — base model / adapter / merged model / client adapters / run dir;
* :mod:`fedtune.eval.runner` — ``fedtune eval``: tables, ``results.json``, ``results.md``;
* :mod:`fedtune.eval.inloop` — the same tasks on a subset every k rounds of ``fedtune run``.

Heavy imports (torch, transformers) happen inside functions, so importing this is cheap.
"""

from fedtune.eval.runner import SUITES, EvalSettings, evaluate_model, run_eval

__all__ = ["SUITES", "EvalSettings", "evaluate_model", "run_eval"]
