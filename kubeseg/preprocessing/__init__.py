"""Preprocessing: crop to the nonzero region, normalize, resample; store memory-mappable arrays."""
