"""HBONE: the mutual-TLS HTTP/2 CONNECT tunnel between proxies (sans-IO core, adapters, pool)."""
