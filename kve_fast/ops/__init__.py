"""Step backends: the per-step arithmetic of Algorithm 2, one module per implementation."""
