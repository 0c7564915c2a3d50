"""Compute cost of DrPO vs reward-gradient (DRaFT) updates: analytic FLOPs at paper scale (flops), measured
per-component time (profile), the report (report), and the real architectures without weights (architectures)."""
