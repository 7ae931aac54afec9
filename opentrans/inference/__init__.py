"""Inference over a model: runners, evaluation loops, one-image segmentation and training-free evaluation.

Layering: ``data, metrics -> models -> inference -> prune | finetune | deploy``; the models package never imports
a dataset, and everything that runs a model over one (mIoU, agreement, sliding windows, prompt sets) lives here.

* :mod:`~opentrans.inference.evaluate`: the runner protocol (:class:`~opentrans.inference.evaluate.Runner`,
  :class:`~opentrans.inference.evaluate.TorchRunner`) and the loops on it (``evaluate``, ``agreement``).
* :mod:`~opentrans.inference.sliding`: runner and dataset wrappers (sliding windows, short-side resize, prompt sets,
  logit scale) and the text-embedding cache.
* :mod:`~opentrans.inference.training_free`: what ``opentrans eval`` assembles, per dense mode and paper protocol.
* :mod:`~opentrans.inference.segment`: ``opentrans segment`` (one image, an overlay PNG).
"""
