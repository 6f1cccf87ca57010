"""The SageMaker platform ([aws] extra): the Hugging Face LLM DLC behind a real-time endpoint, via boto3."""
