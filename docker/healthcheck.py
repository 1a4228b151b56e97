#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 iff the node answers GET /healthz with 2xx.

Used instead of curl, which the image does not have. Assumes /healthz needs no
token (it is what orchestrators and `docker ps` poll).
"""
import os
import sys
import urllib.request

port = os.environ.get("MESH_PORT", "8700")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as resp:
        sys.exit(0 if 200 <= resp.status < 300 else 1)
except Exception as exc:  # any failure means unhealthy; say why in `docker inspect`
    print(f"healthcheck failed: {exc}", file=sys.stderr)
    sys.exit(1)
