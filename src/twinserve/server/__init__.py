"""The LLM microservice: the engine behind TGI, OpenAI and SageMaker routes."""
