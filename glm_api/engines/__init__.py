"""Engines own the torch models, their threads and their batching; serving talks to them only
through the interfaces in :mod:`glm_api.engines.base`."""
