"""Tasks: the problems experiments train on (data, model, loss and evaluation), one module each."""
