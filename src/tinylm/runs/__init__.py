"""A run directory in use: loading any model, evaluation, the model card, comparison, exports of a run, the demo."""
