"""Data in: reading TinyStories, tokenizers, token shards and batches, hub downloads, a run's prepared inputs."""
