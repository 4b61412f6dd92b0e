"""The world the federation runs in: the 6G cell tree and device profiles (topology), the
network model (bytes per link, simulated round time, availability) and mobility between cells."""
