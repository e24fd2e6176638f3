"""The built-in dashboard: live per-decoder latency and cost at ``/dashboard``, for servers
without Prometheus and Grafana. One self-contained page (inline SVG charts, no external
assets) polls ``/dashboard/data``, which is computed from the server's own Prometheus
registry."""

from powerserve.dashboard.routes import install

__all__ = ["install"]
