"""The .cell grammar, shipped as package data."""
