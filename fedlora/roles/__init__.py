"""What each tier does in a round, one module per role: the END device, the neighbourhood
aggregator (one cell), the sub-urban aggregator (sums up the tree), the cloud's round, HierFAVG
cell models, and the in-process stand-ins that run every role in one process."""
