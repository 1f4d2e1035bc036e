"""Alternative execution backends for the same estimate (currently devinterp, the reference)."""
