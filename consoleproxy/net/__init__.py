"""The asyncio layer: sockets, transports and protocols, kept thin over the pure code.

listener (accept, limits, PROXY header, the first request head), relay (the console's bytes
both ways), vncconn (the VNC connection during the RFB handshake), dns (the a-b-c-d responder),
memory (returning freed memory to the system).
"""
