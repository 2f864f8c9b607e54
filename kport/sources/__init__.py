"""Kernel event sources: one module per kernel mechanism."""
