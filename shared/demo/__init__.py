"""The demo farm behind ``buildtel demo``."""
