"""The web front door: FastAPI app factory, routers, templates and static files."""
