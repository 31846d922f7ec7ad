"""The machinery of a run, below the SelMix loop.

Evaluation and the model views (frozen cached features or the whole backbone), the feedback
step, one process or ``torchrun`` (collective, distributed), hardware, precision and memory
choices, timing, optimisers, the settings (:mod:`selmix.engine.config`), pre-training,
semi-supervised pre-training and the loggers. It uses :mod:`selmix.core`, :mod:`selmix.data`
and :mod:`selmix.models`, and never the layers above it.
"""
