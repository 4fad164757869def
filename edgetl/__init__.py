"""edgetl: a folder of labelled images to a fast, small classifier for the edge."""

__version__ = "0.1.0"
