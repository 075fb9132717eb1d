"""Celery worker side: ORT inference, the pipeline, tasks. Never imports torch."""
