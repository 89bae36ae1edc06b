"""The Flask front end (HTML pages, REST API v1, admin).

Not built yet: it arrives with the web issue. It must never import torch; it enqueues work by
task name only.
"""
