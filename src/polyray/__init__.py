"""polyray: compute a universal model's embedding once, serve it to many clients."""

__version__ = "0.1.0"
