"""Generation: the fast GRPO engine (`engine`), the one decode engine (`decode`), continuous batching
for the server (`batching`), and retrieval-augmented answers and streaming (`rag`)."""
