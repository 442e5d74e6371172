"""The engine: the model object and what it runs on (llama.cpp in this process, or a server over HTTP)."""
