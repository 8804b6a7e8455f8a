"""The head on cached vectors and fine-tuning of the module with it."""
