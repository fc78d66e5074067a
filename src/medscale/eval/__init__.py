"""What every objective's evaluation shares: each sample once across ranks (`gather`), medical
metrics (`metrics`), ROC/PR/calibration curve data (`curves`) and results on disk (`results`).
Nothing here prints or draws (`medscale.report` renders results), and nothing here knows an
objective: each evaluates itself (`medscale.tasks`)."""
