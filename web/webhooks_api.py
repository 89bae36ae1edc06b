"""Webhooks: a token's signing secret and its rotation, each job's delivery log and replay,
failing endpoints for admins (routes on the api and admin_api blueprints)."""

from __future__ import annotations
