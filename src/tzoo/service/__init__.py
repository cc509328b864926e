"""Services between the web layer and the analyses: caching, computing, storing."""
