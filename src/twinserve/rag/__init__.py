"""The RAG business microservice: ingest documents into Qdrant, retrieve (and rerank) context for
a question, build the prompt within the model's limits, and answer with sources.

It reaches the LLM only through `twinserve.client.LLMClient` and imports nothing of the engine or
the server, so it deploys (and scales) apart from the GPU-bound LLM microservice.
"""
