"""Flower apps of the upper tiers: the ServerApp (the cloud's round, or an edge's service), the
cloud's Flower transport and edge runner, the edge service, and the simulation launcher."""
