"""`wanmoe serve`: a local web app and HTTP API over the Python API (jobs, previews, history); see docs/app.md."""
