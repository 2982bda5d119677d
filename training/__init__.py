"""Training code (installed as ``dynts.training``): the bundled tiny reasoner and the DynTS Importance Predictor.

Nothing in inference imports this package: ``dynts`` (core), ``dynts.kernels`` and ``dynts.integrations`` stand
below it, and ``dynts.evals`` and the ``dynts label`` / ``dynts train-predictor`` commands use it.
"""
