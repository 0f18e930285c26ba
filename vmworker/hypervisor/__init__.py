"""Hypervisor drivers behind one small interface (``base.Driver``)."""
