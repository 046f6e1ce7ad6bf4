"""Tools around the proxy: cli (the consoleproxy command), diagnose (probe a VNC port), demo and
demo_app (the demo VNC server and page), loadbalancer (HAProxy configuration), workers (several
worker processes on one port).
"""
