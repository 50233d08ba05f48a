"""waypoint: the optional per-namespace L7 proxy."""
