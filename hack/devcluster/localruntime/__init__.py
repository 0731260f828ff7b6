"""A stand-in kubelet for one local node: pods bound to it run as plain processes on this machine.

Test and playground infrastructure only; the operator never imports it. See docs/local-runtime.md.
"""
