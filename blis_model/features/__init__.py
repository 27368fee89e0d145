"""Step features: BLIS's trained-physics basis (parity) and our physics feature set."""
