"""Cluster launch: submitit jobs for training and data prep, sbatch rendering, run status."""
from .status import format_status, run_status
from .submit import LaunchError, launch_prep, launch_train

__all__ = ["LaunchError", "format_status", "launch_prep", "launch_train", "run_status"]
