"""Evaluation: gather de-duplicated predictions from every rank, score them with medical metrics,
save them to the run directory. Nothing here prints; `medscale.report` renders results."""
