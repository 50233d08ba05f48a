"""ztunnel listeners: one module per port, all shaped alike (bind in __init__, run, drain)."""
