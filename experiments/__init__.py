"""Experiments: YAML manifests, the resumable runner, reports and benchmarks."""
