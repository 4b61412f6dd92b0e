"""Aggregation maths: weighted sums that compose up the tiers, the strategies that turn the
cloud's mean into the next global adapter, and client-level differential privacy."""
