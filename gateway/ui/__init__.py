"""The central-station page's static files (``static/``), served by ``gateway.sources.http.ui``."""
