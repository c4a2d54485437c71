"""The gateway service: daemon (main.py), its card worker (worker.py), the socket API (server.py) and its client (client.py)."""
