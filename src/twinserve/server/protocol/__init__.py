"""Wire formats: pydantic schemas per protocol and the adapters to and from the engine.

The client (`twinserve.client`) parses responses with these same schemas, so a server
and a client of one version can never disagree on a field.
"""
