"""Edit hidden outputs, not weights: fit, contrast, ablate and weight edits of probe targets."""
