"""The engine: admission, per-model queues, batch forming and execution. No HTTP in here."""
