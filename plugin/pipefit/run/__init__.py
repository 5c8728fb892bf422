"""The training run: preflight, engine, precision, loop, reporting, checkpoints, export, watchdog, main."""
