"""HBONE: the mutual-TLS HTTP/2 CONNECT tunnel between proxies (sans-IO core, adapters, pool).

Modules (import from them directly):

- `h2core`: `H2Connection`, the sans-IO HTTP/2 connection specialised for CONNECT
  (bytes in -> events, bytes out); `ErrorCode`; the event classes.
- `request`: `request_headers`, `forwarded_for`, `new_traceparent`, `parse_connect`,
  `parse_authority`, `format_authority`; the server's decision types `ConnectRequest`,
  `Accept(sock=... | serve=...)`, `Refuse(status, reason)`, `Decision`, `Handler`.
- `stream`: `HboneConnection` (asyncio BufferedProtocol) and `HboneStream`
  (`read`, `readexactly`, `write`, `drain`, `drained`, `write_eof`, `reset`,
  `splice_socket`).
- `client`: `connect(addr | sock, ssl_ctx, trust, expected_identity) -> HboneConnection`.
- `server`: `HboneServer(sock, ssl_ctx, trust, handler)` with `run()`, `started()`,
  `drain(timeout)`, `close()`, `address`.
- `pool`: `HboneConnectionPool(connect_socket)` with `open_stream(...)`, `drain()`,
  `close()`; `PoolKey`; `default_connect_socket`.
- `errors`: `HboneError` (`status`, `refused`).
- `tuning`: `tune_allocator()`, for process entry points that relay HBONE traffic.
"""
