"""Training entry points, configs and input pipelines."""
