"""Flower apps on the SuperNodes: the END device's ClientApp (thin over fedlora.roles.device) and an
edge's relay from its parent to its edge service."""
