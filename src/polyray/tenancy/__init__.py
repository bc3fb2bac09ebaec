"""Clients, API keys, quotas, cost attribution and the usage ledger (engine-side: no HTTP)."""
