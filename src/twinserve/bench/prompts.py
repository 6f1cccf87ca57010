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


# --------------------------------------------------------------- prefix-cache workloads
CHAT_SYSTEM_PROMPT = (
    "You are a patient, friendly assistant for a small software team. Answer in plain English, "
    "keep every answer short and concrete, prefer one clear example over a long list, say so when "
    "you are not sure, and never invent facts. When a question follows an earlier answer, build on "
    "what you already said instead of repeating it."
)

FOLLOW_UPS = [
    "Can you give me a concrete example?",
    "Why is that the case?",
    "Summarize that in one sentence.",
    "What is a common misconception about it?",
    "How would you explain it to a beginner?",
    "What should I read next to learn more?",
    "Is there a simple way to remember it?",
]

SHARED_SYSTEM_PROMPT = "Answer the question using only the passage the user gives. Be brief."

# distinct paragraphs: a passage of any length is cut from them (cycling), so each variant of
# the shared-context workload can start from another paragraph and share no block with the others
PASSAGE = [
    "Serving a language model is mostly a scheduling problem. Requests arrive at random times with "
    "prompts of very different lengths, and each one needs a first token quickly and the following "
    "tokens at a steady pace. A server that processes one request at a time leaves most of the "
    "hardware idle, because generating a single token reads every weight of the model but does very "
    "little arithmetic with them.",
    "Continuous batching fixes this by treating every decoding step as a new batch. Finished requests "
    "leave the batch after any step and waiting requests join it as soon as memory allows, so the "
    "batch stays full without anyone waiting for the slowest member. The cost is bookkeeping: the "
    "scheduler must know, at every step, which rows are prefilling, which are decoding and how much "
    "key-value cache each one holds.",
    "The key-value cache stores, for every layer and every position of a sequence, the keys and values "
    "that attention needs. It grows by one position per generated token and is by far the largest "
    "piece of state a server keeps. Its size limits how many requests can run together, which is why "
    "servers budget it in tokens and refuse or queue work that would not fit.",
    "Prefill is the first forward pass over a prompt. It computes the cache entries of every prompt "
    "position at once and is bound by arithmetic rather than memory, so a long prompt can take far "
    "longer than many decoding steps. Time to first token is therefore dominated by prefill, and any "
    "prompt tokens that do not have to be prefilled again are a direct saving for the user.",
    "Many prompts start the same way. A chat application re-sends the whole conversation on every "
    "turn, a retrieval pipeline puts the same long system prompt and often the same documents in "
    "front of every question, and agents repeat their tool descriptions on each call. A prefix cache "
    "keeps the cache entries of earlier prompts and reuses them when a new prompt starts with the "
    "same tokens, so only the new suffix is computed.",
    "Prefix caches are usually organised in fixed blocks of tokens. Each block is identified by a hash "
    "of its tokens and of every token before it, so two prompts share a block only when they agree "
    "from the very first token. Looking up a prompt means hashing its blocks in order and following "
    "them as long as they are cached; the first miss ends the match.",
    "Memory for cached prefixes competes with memory for running requests. A good policy gives running "
    "requests priority, evicts the least recently used prefixes when space is needed, and keeps the "
    "entries that many requests share. Measuring the hit rate, the share of prompt tokens served from "
    "the cache, tells an operator whether the cache is large enough for the traffic it sees.",
    "Correctness matters as much as speed. Reusing cached entries must give exactly the same output as "
    "computing them again, which holds when the cached entries were computed for the same tokens at the "
    "same positions with the same model. Tests compare greedy outputs with and without the cache, token "
    "for token, to make sure the optimisation changes nothing but the time it takes.",
]
