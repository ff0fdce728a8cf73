"""Scaling-law sweeps: size ladders, spec expansion, running (local or SLURM array), fits, plots."""
