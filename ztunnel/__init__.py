"""ztunnel: the per-node proxy that captures workload traffic and carries it over HBONE."""
