"""Rule-based experiment planning: from a dataset fingerprint to nnU-Net v2 plans."""
