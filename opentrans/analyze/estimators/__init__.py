"""Plug-in alpha estimators: a module here registers an :class:`~opentrans.analyze.spectral.Estimator` with
``SPECTRAL_ESTIMATORS.add(name, Estimator(...))`` and becomes an ``--estimator`` choice of ``analyze`` and
``finetune``. The built-in estimators (opentrans, opentrans-qkv, weightwatcher) register in
:mod:`opentrans.analyze.spectral`."""
