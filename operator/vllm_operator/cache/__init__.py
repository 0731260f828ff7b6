"""The model cache: what is known about a model before (and while) its weights are downloaded.

``fit`` decides from the model's config.json and safetensors sizes whether it fits the accelerators of one
replica, before any Pod is created. ``download`` turns the download Job (render/puller.py) and the puller's
``/progress`` (read by ``progress``) into ``status.cache``.
"""
