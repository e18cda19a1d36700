"""The shipped example cells, also shipped as package data (rnnc.torch reads lstm.cell and gru.cell)."""
