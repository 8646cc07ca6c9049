"""Federated hyperparameter optimisation on optuna: ``fedtune hpo STUDY.yaml`` (docs/hpo.md).

:mod:`fedtune.hpo.space` reads and validates a study (a run config plus an ``hpo:`` section);
:mod:`fedtune.hpo.study` runs it (samplers, pruners over federated rounds, synchronous successive
halving from checkpoints, resumable studies in a database); :mod:`fedtune.hpo.report` writes the
trial table, the best configuration, plots and the summary. In-run tuning of client
hyperparameters is the ``fedex`` algorithm (:mod:`fedtune.algorithms.fedex`).
"""

from fedtune.hpo.space import HpoConfig, Study, load_study

__all__ = ["HpoConfig", "Study", "load_study", "run_study"]


def run_study(study, **kw):
    """Run or resume ``study`` (see :func:`fedtune.hpo.study.run_study`; imports optuna lazily)."""
    from fedtune.hpo.study import run_study as _run

    return _run(study, **kw)
