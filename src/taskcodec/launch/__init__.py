"""Launchers: turn a job description into a cluster job. They know nothing of torch."""
