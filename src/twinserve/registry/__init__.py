"""Model registry: where models come from and how they land on disk in Hugging Face layout."""
