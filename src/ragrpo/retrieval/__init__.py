"""Retrieval: documents into a LanceDB table (`index`, with `embed` for fast batch embedding and
chunking), and the one search path over it (`search`) that training, evaluation and serving share."""
