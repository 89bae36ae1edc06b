"""Live push: GET /api/v1/jobs/<id>/events, a text/event-stream of a job's events (routes on
the api blueprint)."""

from __future__ import annotations
