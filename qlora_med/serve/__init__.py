"""Talking to a trained model: the terminal chat session and the Gradio page."""
