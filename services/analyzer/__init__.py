"""Build analytics: regression (change-point) detection over build durations."""
