"""Named experiment presets built from the library: grokking runs and activation comparisons."""
