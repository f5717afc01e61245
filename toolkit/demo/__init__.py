"""The Gradio sketchpad demo."""
