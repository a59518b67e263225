"""Adapters: the only modules that import vendor libraries (aiohttp, google-genai,
google-auth, Pillow). Each turns a service's answers into the core's types and errors."""
