"""Monitoring: a local Prometheus server scraping Triton and clinfer metrics."""
