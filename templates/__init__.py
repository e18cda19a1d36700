"""jinja2 CUDA templates, shipped as package data."""
