"""Text -> token ids: loading the HF tokenizer (``tokenizer``) and encoding examples into packed
token arrays (``tokenize``). Used by ``mtl_jax.tasks`` and ``mtl_jax.data``; imports neither."""
