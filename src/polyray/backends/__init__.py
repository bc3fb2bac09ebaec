"""Backends turn token batches into vectors. They know nothing of clients, caches or HTTP."""
