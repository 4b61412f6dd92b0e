"""END-device side: the Flower ClientApp (thin over fedlora.roles.device)."""
