"""Urban/cloud tier: the Flower ServerApp, its Flower transport and the simulation launcher."""
