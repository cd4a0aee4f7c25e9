"""Training: one Ray Train loop for every benchmark."""
