"""Objectives: what a model learns and everything that differs between objectives.

- `medscale.tasks.base`: the `Task` protocol, `TaskBase` (defaults), the registry (``train.objective``:
  a registered name, an entry point in the group ``medscale.objectives``, or ``package.module:Class``).
- `medscale.tasks.classification`: multiclass or multilabel classification, evaluated with AUROC,
  AUPRC and bootstrap CIs.
- `medscale.tasks.mae`: masked-autoencoder pretraining of a timm ViT (its ``mae`` config section).

Nothing is imported here: naming an objective imports only its own module.
"""
