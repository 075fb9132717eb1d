"""The classification core that `bonexray run` (in-process) and the Celery workers share.

records.py    what travels from the pipeline to the store (study tasks in; view, study
              and batch results out; study status values)
inference.py  onnxruntime sessions: providers, GPUs, the model's input contract
batching.py   decode views on threads, batch them, run the model, aggregate per study
chunks.py     one chunk of a job: claim the studies, classify, write, retry on outages
heatmaps.py   the model's CAM output on a job's views, written as overlay PNGs

Never imports torch.
"""
