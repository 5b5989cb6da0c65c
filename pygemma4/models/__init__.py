"""Gemma 4 model files made here rather than downloaded: the demo model and the synthetic
full-size models, and the cache they are written into."""
