"""distillery: distil a large LLM teacher into a small, fast student, serve it and keep improving it."""
