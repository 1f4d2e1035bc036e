"""Named experiments built from the library: grokking runs, activation comparisons,
homogeneity across widths, and the ground-truth validation suite."""
