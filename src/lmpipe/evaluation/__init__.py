"""Held-out evaluation: language-model metrics and the n-gram baseline a trained model is compared against."""
