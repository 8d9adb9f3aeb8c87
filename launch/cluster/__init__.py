"""Cluster submission: submitit jobs and the SLURM environment rules."""
