"""The mlfleet node agent: registration, model cache, model hosts, workers and the inference endpoint."""
