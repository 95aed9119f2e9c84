"""Reading, checking and preparing LLaVA-Med datasets."""
