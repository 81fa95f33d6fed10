"""``lmstrain study``: the same model trained at several resolutions, scored on the original
grid, and compared case by case (:mod:`~lmstrain.study.runner` trains and scores,
:mod:`~lmstrain.study.analysis` summarises and compares)."""
