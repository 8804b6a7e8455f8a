"""Module handles (trust, fingerprint, load) and the bottleneck cache with extraction."""
