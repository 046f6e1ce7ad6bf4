"""Pure protocol code: bytes or values in, events, bytes out or a named error; no I/O.

rfb (what both RFB handshakes share), rfb_server (the VNC server's handshake), rfb_client (the
browser's), rfb_messages (the client-message filter, ServerInit's name bound), wsframes (the
console's WebSocket frames), proxyproto (the PROXY protocol header), forwarded (X-Forwarded-For /
Forwarded), query (raw query strings), hostnames (the a-b-c-d.<suffix> mapping), addresses (IP
parsing, IPv4-mapped IPv6).
"""
