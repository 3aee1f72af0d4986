"""Training: the ADSH asymmetric loop, per-model losses, database-code updates, evaluation metrics."""
