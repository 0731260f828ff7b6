"""Autoscaling on what the engines report: how many replicas an LLMDeployment's load asks for.

``decide`` holds the pure decisions (no I/O, no clocks: the caller passes the scrape samples and the
monotonic time); the controller feeds it every scrape sweep and writes ``spec.replicas`` through the
scale subresource when a decision changes it.
"""
