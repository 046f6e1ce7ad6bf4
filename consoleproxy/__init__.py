"""consoleproxy: a console proxy server (noVNC in the browser, WebSocket to VNC on the hypervisor)."""

__version__ = "0.3.0"
