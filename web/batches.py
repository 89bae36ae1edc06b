"""Batch submissions: POST/GET /api/v1/batches and cancel (routes on the api blueprint)."""

from __future__ import annotations
