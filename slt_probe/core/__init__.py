"""The estimator itself: data sources, losses, the parameter layout, the batched model,
samplers, the settings, the prepared problem (``target``), the chain driver, the
estimator and its diagnostics, the record of how an estimate was made, and the engine
that runs one estimate on a target. Nothing here knows about calibration, training
loops, files or experiments (the package above builds on it)."""
