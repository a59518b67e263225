"""Edges: where requests come in. The upload event handler, the HTTP function, the
command line, and the parsing and logging they share."""
