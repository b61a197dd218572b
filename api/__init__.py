"""The web front door: a job API over the render deployment (FastAPI) and a small page that uses it."""
