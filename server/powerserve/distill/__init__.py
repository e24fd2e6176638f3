"""Power self-distillation: teach the model to sample, at standard cost, what power sampling finds.

Two stages, each a ``powerserve distill`` command:

1. ``teacher`` (:mod:`.teacher`): draw samples from p(x)^alpha / Z with a power decoder (by
   default ``power_mcmc``, alpha 4), in-process or from a running server, into a resumable
   JSONL file (:mod:`.records`).
2. ``train`` (:mod:`.train`): fine-tune the base model by maximum likelihood on those samples,
   loss on completion tokens only, and write a checkpoint with a manifest (:mod:`.manifest`).

The ``distilled`` decoder then serves the checkpoint; its self-reward is measured under the
base model, so every decoder is compared on one scale.
"""

from powerserve.distill.records import DistillError

__all__ = ["DistillError"]
