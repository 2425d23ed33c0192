"""The job's stages: executor-agnostic steps (no Ray here) composed into selectors' plans."""
