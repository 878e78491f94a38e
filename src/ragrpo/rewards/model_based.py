"""Rewards that run a model: how much the retrieved context explains the answer (a language model),
and how close the answer is to the question (an embedding model).

Each loads its model on the first call and keeps it; a pickled reward leaves the model behind and
loads it again where it is next called, so a reward can travel to another process as its settings.
"""

from __future__ import annotations

from ragrpo import RagrpoError
from ragrpo.rewards.base import Reward, answer_text, column, completion_text, passages, prompt_text


class _Loads(Reward):
    """A reward that keeps a loaded model in `self._loaded`, which pickling leaves out."""

    def __init__(self):
        self._loaded = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}


class ContextReliance(_Loads):
    """Answer log-likelihood with the 'context' minus without it, under the base model (nats).

    How much the retrieved context explains the answer, without labels. Both prompts are
    `ragrpo.prompts.build_prompt(query, passages)` in a user turn of the chat template, the second
    with no passages, so the passages are the only difference. Positive: the context makes the answer
    likelier (it draws on it); near 0 or negative: the answer would be said anyway. The `query` column
    is optional (an empty query without it). An empty answer scores 0.

    `model` is the scoring language model: None for the packaged base model (the adapter-free
    reference of a LoRA run), a Hugging Face id or folder, or a loaded `(model, tokenizer)`. Cost: two
    forward passes per completion, over the prompt, the passages and the answer, on a second copy of
    the model next to the one being trained.

    >>> reward = ContextReliance()  # loads nothing yet
    >>> reward(["Finch invented the island."], context=[["Aldous Finch invented an arctic island."]],
    ...        query=["Who made up the island?"])  # doctest: +SKIP
    [1.9...]
    """

    __name__ = "context_reliance"

    def __init__(self, model=None):
        super().__init__()
        self.model = model

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if isinstance(self.model, tuple):  # a model in memory has no name to be loaded again by
            raise RagrpoError("context_reliance with a loaded (model, tokenizer) cannot be pickled; give it a name")
        return state

    def __call__(self, completions, context=None, query=None, **kwargs) -> list[float]:
        from ragrpo.models import answer_logprobs, load_model
        from ragrpo.prompts import build_prompt

        contexts = column(context, "context")
        queries = [completion_text(q) for q in query] if query is not None else [""] * len(completions)
        answers = [answer_text(c) for c in completions]
        if not any(answers):
            return [0.0] * len(answers)
        if self._loaded is None:
            self._loaded = self.model if isinstance(self.model, tuple) else load_model(self.model)
        lm, tokenizer = self._loaded
        with_context = [build_prompt(q, passages(c)) for q, c in zip(queries, contexts, strict=True)]
        without = [build_prompt(q, []) for q in queries]
        given_context = answer_logprobs(lm, tokenizer, with_context, answers)
        given_query = answer_logprobs(lm, tokenizer, without, answers)
        return [a - b for a, b in zip(given_context, given_query)]


class Relevance(_Loads):
    """Cosine similarity of the answer's and the 'query' embeddings (configured embedder), in [0, 1].

    Negatives are clipped to 0. The query is the `query` column, else the prompt's last user message.
    `embedding_model` is a sentence-transformers name or folder (None: the packaged all-MiniLM-L6-v2,
    as `ragrpo index` uses). An empty answer or query scores 0.

    >>> reward = Relevance()  # loads nothing yet
    >>> reward(["The detective is the killer.", "Bananas are yellow."],
    ...        query=["a detective who is the murderer"] * 2)  # doctest: +SKIP
    [0.8..., 0.0...]
    """

    __name__ = "relevance"

    def __init__(self, embedding_model=None):
        super().__init__()
        self.embedding_model = embedding_model

    def _embedder(self):
        if self._loaded is None:
            from sentence_transformers import SentenceTransformer

            from ragrpo.models import device, resolve_embedder

            name = resolve_embedder(self.embedding_model)
            try:
                self._loaded = SentenceTransformer(name, device=device())
            except Exception as exc:
                raise RagrpoError(f"embedding model {self.embedding_model!r} could not be loaded: {exc}") from None
        return self._loaded

    def __call__(self, completions, prompts=None, query=None, **kwargs) -> list[float]:
        if query is not None:
            queries = [completion_text(q) for q in query]
        elif prompts:
            queries = [prompt_text(p) for p in prompts]
        else:
            queries = column(None, "query")
        answers = [answer_text(c) for c in completions]
        scores = [0.0] * len(answers)
        todo = [i for i, (a, q) in enumerate(zip(answers, queries, strict=True)) if a.strip() and q.strip()]
        if not todo:
            return scores
        texts = [answers[i] for i in todo] + [queries[i] for i in todo]
        vectors = self._embedder().encode(texts, normalize_embeddings=True)  # (2P, dim): answers, then queries
        for j, i in enumerate(todo):
            scores[i] = min(1.0, max(0.0, float(vectors[j] @ vectors[len(todo) + j])))
        return scores


def get_context_reliance_reward(model=None) -> ContextReliance:
    return ContextReliance(model)


def get_relevance_reward(embedding_model=None) -> Relevance:
    return Relevance(embedding_model)
