"""Pure protocol code: bytes or values in, events, bytes out or a named error; no I/O.

rfb (the RFB handshake both ways, the client-message filter), wsframes (the console's WebSocket
frames), proxyproto (the PROXY protocol header), forwarded (X-Forwarded-For / Forwarded),
query (raw query strings), hostnames (the a-b-c-d.<suffix> mapping), addresses (IP parsing,
IPv4-mapped IPv6).
"""
