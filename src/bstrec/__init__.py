"""bstrec: a sequence-aware two-stage recommender following Behavior Sequence Transformer (BST)."""

__version__ = "0.1.0"
