"""The mlfleet coordinator: models, deployments, the planner and routing tables."""
