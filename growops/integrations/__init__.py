"""Integrations with other libraries, imported on demand (``growops.integrations.hf`` needs transformers)."""
