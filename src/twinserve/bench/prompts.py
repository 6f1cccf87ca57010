"""A built-in set of short chat prompts (~40 tokens with a chat template) for benchmarks."""

from __future__ import annotations

QUESTIONS = [
    "What is the difference between a process and a thread?",
    "Explain what a large language model is in simple terms.",
    "Give me three tips for writing clean Python code.",
    "Why is the sky blue during the day?",
    "How does a hash map work under the hood?",
    "What are the main causes of inflation?",
    "Summarize the plot of Romeo and Juliet.",
    "What is the capital of Australia and why?",
    "How do vaccines train the immune system?",
    "Explain recursion to a ten year old.",
    "What is continuous batching in LLM inference?",
    "Write a haiku about autumn leaves.",
    "What are the benefits of regular exercise?",
    "How does public key cryptography work?",
    "Describe the water cycle briefly.",
    "What is the difference between RAM and disk storage?",
    "Give me a recipe idea for a quick dinner.",
    "Why do cats purr?",
    "Explain the rules of chess in a few sentences.",
    "What is a black hole?",
    "How can I improve my sleep quality?",
    "What does a product manager do?",
    "Explain gradient descent in one paragraph.",
    "What is the tallest mountain in Europe?",
    "How do solar panels produce electricity?",
    "What are microservices and when should I use them?",
    "Describe the taste of coffee to someone who never had it.",
    "What is the Pythagorean theorem?",
    "Why do we have leap years?",
    "How does a search engine rank pages?",
    "What is the role of mitochondria in a cell?",
    "Give me a motivational quote and explain it.",
]

LONG_TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines were "
    "programmed by rewiring panels; then came stored programs, assembly languages, compilers, operating "
    "systems, networks and the web. Each layer hid the details of the one below it, letting more people "
    "build more ambitious systems. Large language models are the newest such layer: they let people describe "
    "what they want in plain words. "
)


def chat_messages(n: int) -> list[list[dict[str, str]]]:
    """n single-turn conversations, cycling through the built-in questions."""
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def long_prompt_ids(tokenizer: object, n_tokens: int) -> list[int]:
    """Exactly n_tokens of English text, for time-to-first-token measurements."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return ids[:n_tokens]
