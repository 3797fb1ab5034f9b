"""Inference: sampling settings applied to logits, and the one generation engine every command uses."""
