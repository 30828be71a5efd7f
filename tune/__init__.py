"""Sweep entry points and search-space files (``python -m tune.sweep`` = ``centernet-ray tune``)."""
