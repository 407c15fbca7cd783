"""Samplers that turn (model, data, components, config) into per-replica loss traces."""
