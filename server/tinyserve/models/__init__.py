"""Model-side pieces that are not the C++ core: the default model, the tokenizer rebuilt from a
GGUF's own vocabulary (tokenizer.py), and chat templates (chat_template.py)."""
