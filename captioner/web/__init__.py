"""The web app: FastAPI routes (app.py), micro-batching (batcher.py), upload decoding (upload.py), the page (static/)."""
