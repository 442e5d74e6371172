"""This machine: its GPU and cores, installing llama-cpp-python, and building and starting llama-server."""
