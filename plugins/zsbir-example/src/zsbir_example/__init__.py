"""An example zsbir plugin (see losses.py)."""
