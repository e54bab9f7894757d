"""The HTTP API (FastAPI under Ray Serve): OpenAI-style completions and the console API."""
