"""Predict and tune: a discrete-event simulator of the served variants, and a configuration search."""
