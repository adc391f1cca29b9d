"""HTTP routers of the core server; ``ROUTERS`` is what ``create_app`` includes.

- ``ops``: ``/healthz``, ``/readyz``, ``/metrics``
- ``device``: enrollment and the device-facing ``/api/v1/device/*`` endpoints
- ``admin``: API keys, enrollment tokens, devices, groups, saved filters, assignments, audit log
- ``bundles``: bundle registry, publications and the TUF admin endpoints
- ``tuf_files``: the TUF repository over HTTP (``/tuf/metadata``, ``/tuf/targets``)
"""

from __future__ import annotations

from fastapi import APIRouter

from fleet_server.api import admin, bundles, device, ops, tuf_files

ROUTERS: tuple[APIRouter, ...] = (ops.router, device.router, admin.router, bundles.router, tuf_files.router)
