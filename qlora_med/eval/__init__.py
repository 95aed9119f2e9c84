"""Evaluation: the paper's VQA metrics, generation and chat scoring."""
