"""The Celery side: app.py (the Celery app and its signals), tasks.py (the chunk task),
reaper.py (sends again what no live worker holds). The work itself is bonexray.pipeline.
Never imports torch."""
