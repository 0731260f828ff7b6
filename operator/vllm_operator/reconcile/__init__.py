"""The reconcile loop: watched stores, the work queue, drift and ownership, status and when to write it."""
