"""Figures the book draws from the package's own configs and data (matplotlib), so they stay
true when a config changes. One module per subject; each function returns a matplotlib Figure.
Imports matplotlib only when a figure is drawn."""
