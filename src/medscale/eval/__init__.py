"""Evaluation: gather de-duplicated predictions from every rank, score them with medical metrics,
keep curve data and a few sample images, save them to the run directory. Nothing here prints or
draws; `medscale.report` renders results."""
