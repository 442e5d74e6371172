"""Model files: the catalogue, the Hub download, files in parts, and the GGUF header and its limits."""
