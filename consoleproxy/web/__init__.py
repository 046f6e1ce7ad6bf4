"""HTTP services on aiohttp: webapps (the console page, static files, redirect and ACME port),
admin (the admin API and recordings' playback), health (/healthz, /readyz and checks), assets
(where the page and noVNC files are).
"""
